"""TCP passthrough listener: bytes both ways between a downstream connection and one upstream host."""

from __future__ import annotations

import asyncio
from typing import Any

from diktyo.proxy.http.policies import LbContext
from diktyo.proxy.network.upstream import open_upstream


class _Upstream(asyncio.Protocol):
    def __init__(self, down: TcpProxy) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        d = self.down
        d.sent += len(data)
        if d.transport is not None:
            d.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()

    def pause_writing(self) -> None:
        if self.down.transport is not None:
            self.down.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.down.transport is not None:
            self.down.transport.resume_reading()


class TcpProxy(asyncio.Protocol):
    """Downstream side of one passthrough connection (``Listener.direction == "tcp"``)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.buf: list[bytes] = []
        self.sent = 0
        self.received = 0
        self.peer_key: Any = None
        self.host: Any = None
        self.cstate: Any = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.ctx
        ctx.connections.add(self)
        rt = ctx.runtime()
        cs = self.cstate = rt.clusters.get(ctx.cluster)
        host = cs.pick_host(LbContext({}, "", None)) if cs is not None else None
        if host is None:
            transport.close()
            return
        self.host = host
        cs.on_request_start(host)
        self.peer_key = rt.labels_for(ctx.reporter, cs, host)
        rt.stats.metrics.tcp_open(self.peer_key)
        task = rt.loop.create_task(self._connect(rt, cs, host))
        rt.sidecar.tasks.add(task)
        task.add_done_callback(rt.sidecar.tasks.discard)

    async def _connect(self, rt: Any, cs: Any, host: Any) -> None:
        try:
            async with asyncio.timeout(cs.cluster.pool.connect_timeout):
                _, up = await open_upstream(
                    rt.loop,
                    host.address,
                    host.port,
                    cs.cluster.tls,
                    lambda: _Upstream(self),
                    host.endpoint,  # auto mTLS to endpoints with a sidecar
                    rt.sidecar.certs,
                )
        except (OSError, TimeoutError):
            cs.on_request_end(host, None, True)
            self.host = None
            if self.transport is not None:
                self.transport.close()
            return
        if self.closed:
            up.transport.close()
            return
        self.up = up
        if self.buf:
            up.transport.write(b"".join(self.buf))
            self.buf = []

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            self.buf.append(data)
            if sum(len(b) for b in self.buf) > 256 * 1024 and self.transport is not None:
                self.transport.pause_reading()

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()
        if self.peer_key is not None:
            stats = self.ctx.stats
            stats.metrics.tcp_bytes(self.peer_key, self.sent, self.received)
            stats.metrics.tcp_close(self.peer_key)
        if self.host is not None and self.cstate is not None:
            self.cstate.on_request_end(self.host, 200, False)
            self.host = None

"""FakeH2Upstream: a real HTTP/2 (h2c, prior knowledge) server on 127.0.0.1 for tests.

Built on diktyo's own server codec. Records every request (with the connection it came on)
and answers by path:

- ``/hold``: waits until ``release_held()`` is called, then answers 200 ``held``;
- ``/trailers``: 200, body ``data``, trailers ``grpc-status: 0`` / ``grpc-message: fine``;
- ``/big/<n>``: 200 with ``n`` bytes (honours the client's flow-control window);
- ``/goaway``: answers 200, then sends GOAWAY(NO_ERROR) naming this stream as the last;
- anything else: 200 with body ``<method> <path> <request body>``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Self

from diktyo.proxy.codec.events import CodecError, HeaderList, RequestHead, ResetReason, ResponseHead
from diktyo.proxy.codec.http2 import DEFAULT_OPTIONS, Http2Options, Http2ServerCodec


@dataclass
class H2Request:
    conn_id: int
    sid: int
    head: RequestHead
    body: bytearray = field(default_factory=bytearray)
    trailers: HeaderList | None = None
    reset: ResetReason | None = None


class _Conn(asyncio.Protocol):
    def __init__(self, server: FakeH2Upstream, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.codec = Http2ServerCodec(self, server.options)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, H2Request] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio hands a BaseTransport; TCP gives a Transport
        self.server.conns.append(self)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.codec.feed(data)
        except CodecError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open_conns.discard(self)

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    # ServerSink
    def on_request_headers(self, sid: int, head: RequestHead) -> None:
        r = H2Request(self.conn_id, sid, head)
        self.requests[sid] = r
        self.server.requests.append(r)

    def on_request_data(self, sid: int, data: bytes) -> None:
        self.requests[sid].body += data
        self.codec.acknowledge(sid, len(data))

    def on_request_trailers(self, sid: int, trailers: HeaderList) -> None:
        self.requests[sid].trailers = trailers

    def on_request_end(self, sid: int) -> None:
        r = self.requests[sid]
        path = r.head.path
        if path == "/hold":
            task = asyncio.get_running_loop().create_task(self._held(sid))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)
            return
        self.answer(sid, r)

    async def _held(self, sid: int) -> None:
        await self.server.release.wait()
        self.codec.send_headers(sid, ResponseHead(200, [(b"content-type", b"text/plain")]))
        self.codec.send_data(sid, b"held", end_stream=True)
        self.flush()

    def answer(self, sid: int, r: H2Request) -> None:
        path = r.head.path
        c = self.codec
        if path == "/trailers":
            c.send_headers(sid, ResponseHead(200, [(b"content-type", b"application/grpc")]))
            c.send_data(sid, b"data")
            c.send_trailers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"fine")])
        elif path.startswith("/big/"):
            c.send_headers(sid, ResponseHead(200, []))
            c.send_data(sid, b"b" * int(path[5:]), end_stream=True)
        else:
            body = f"{r.head.method} {path} ".encode() + bytes(r.body)
            c.send_headers(sid, ResponseHead(200, [(b"x-conn", str(self.conn_id).encode())]))
            c.send_data(sid, body, end_stream=True)
            if path == "/goaway":
                c.goaway()
        self.flush()

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        r = self.requests.get(sid)
        if r is not None:
            r.reset = reason

    def on_send_blocked(self, sid: int) -> None:
        pass

    def on_send_unblocked(self, sid: int) -> None:
        pass


class FakeH2Upstream:
    """``async with FakeH2Upstream() as up:`` -> ``up.port``; ``up.requests``; ``up.conns``."""

    def __init__(self, options: Http2Options = DEFAULT_OPTIONS) -> None:
        self.options = options
        self.requests: list[H2Request] = []
        self.conns: list[_Conn] = []
        self.open_conns: set[_Conn] = set()
        self.release = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    def release_held(self) -> None:
        self.release.set()

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        counter = iter(range(1, 1 << 30))

        def factory() -> _Conn:
            c = _Conn(self, next(counter))
            self.open_conns.add(c)
            return c

        self._server = await loop.create_server(factory, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in list(self.tasks):
            t.cancel()
        for c in list(self.open_conns):
            if c.transport is not None:
                c.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

"""The capture listeners: Istio's virtualOutbound (15001) and virtualInbound (15006).

iptables REDIRECT (``diktyo init`` / the local platform's namespaces) sends every outbound TCP
connection of the app to 15001 and every inbound one to 15006. For each accepted socket:

1. ``SO_ORIGINAL_DST`` gives the address the client dialled (``original_dst``);
2. outbound: the service VIP:port is looked up in ``Snapshot.capture`` (``CaptureTable``).
   Unknown destinations follow ``outboundTrafficPolicy``: ALLOW_ANY -> ``PassthroughCluster``
   (forwarded as TCP to the original destination), REGISTRY_ONLY -> ``BlackHoleCluster``
   (closed). Inbound: the workload port decides; PeerAuthentication (STRICT / PERMISSIVE /
   DISABLE for that port) is applied first; an undeclared port goes to
   ``InboundPassthroughClusterIpv4`` (127.0.0.1:<port>);
3. the protocol is the port's declared one (Istio's port name prefix / ``appProtocol``) or,
   for ``auto``, sniffed from the first bytes (``sniff.detect``; meshConfig
   ``protocolDetectionTimeout``, default none). HTTP/1.x goes to the HTTP connection manager
   exactly as a listener's connection does (``_http_protocol``, the one hand-off point),
   routed as the service the VIP belongs to; everything else is proxied as TCP
   (``diktyo.proxy.tcp_proxy``), with VirtualService ``tcp:`` routes.

Connections addressed to the capture ports themselves are refused (a redirect loop otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

from diktyo.proxy.capture.original_dst import original_dst
from diktyo.proxy.capture.sniff import MAX_SNIFF, detect
from diktyo.proxy.capture.table import (
    BLACKHOLE,
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    CaptureTable,
)
from diktyo.proxy.tcp_proxy import TcpProxy, TcpTarget
from diktyo.snapshot.model import Capture, Listener

log = logging.getLogger("diktyo.proxy")

ProtocolFactory = Callable[[], asyncio.Protocol]


HTTP_KINDS = ("http1", "http2")  # sniffed kinds the HTTP connection managers take


def _http_protocol(ctx: Any) -> asyncio.Protocol:
    """The one place a captured connection is handed to the HTTP connection managers: the
    listeners' own first protocol, which picks HTTP/1.1 or HTTP/2 (prior-knowledge preface, or
    ALPN ``h2``/``istio-h2`` after mTLS) exactly as on a declared HTTP listener."""
    from diktyo.proxy.http.sniffer import DownstreamSniffer

    return DownstreamSniffer(ctx)


class Sniffer(asyncio.Protocol):
    """Buffers a connection's first bytes until ``detect`` decides, then hands the transport
    and the bytes to the protocol ``choose(kind)`` returns (``kind``: http1, http2, tls, tcp)."""

    def __init__(
        self,
        choose: Callable[[str], asyncio.Protocol],
        timeout: float,
        loop: asyncio.AbstractEventLoop,
        on_decided: Callable[[str], None] | None = None,
        connections: set[Any] | None = None,
    ) -> None:
        self.connections = connections  # the listener's: stop() closes undecided ones too
        self.choose = choose
        self.timeout = timeout
        self.loop = loop
        self.on_decided = on_decided
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.connections is not None:
            self.connections.add(self)
        if self.timeout > 0:
            self.timer = self.loop.call_later(self.timeout, self._decide, "tcp")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        kind = detect(self.buf)
        if kind is None and len(self.buf) >= MAX_SNIFF:
            kind = "tcp"
        if kind is not None:
            self._decide(kind)

    def eof_received(self) -> bool | None:
        if not self.done:
            if self.buf:
                self._decide(detect(self.buf) or "tcp")
                proto = self.transport.get_protocol() if self.transport is not None else None
                if proto is not None and proto is not self:
                    return cast(asyncio.Protocol, proto).eof_received()
            return None  # closed before deciding
        return None

    def _decide(self, kind: str) -> None:
        if self.done or self.transport is None or self.transport.is_closing():
            return
        self.done = True
        if self.connections is not None:
            self.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.on_decided is not None:
            self.on_decided(kind)
        proto = self.choose(kind)
        t = self.transport
        t.set_protocol(proto)
        proto.connection_made(t)
        if self.buf and not t.is_closing():
            data, self.buf = self.buf, b""
            # to the transport's protocol now: ``proto`` may have handed the connection on in
            # connection_made (an HTTP/2 connection chosen by ALPN)
            cast(asyncio.Protocol, t.get_protocol()).data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connections is not None:
            self.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Contexts:
    """Listener contexts for the flows of one capture listener, per snapshot runtime.

    They are ordinary ``ListenerContext``s (what ``HttpConnection`` / ``TcpProxy`` expect),
    sharing the capture listener's ``connections`` set so drain and stop see every flow."""

    def __init__(self, sidecar: Any, parent: Any) -> None:
        self.sidecar = sidecar
        self.parent = parent
        self.rt: Any = None
        self.by_key: dict[tuple[str, ...], Any] = {}
        self.table: CaptureTable | None = None

    def refresh(self) -> tuple[Any, CaptureTable]:
        rt = self.sidecar.rt
        if rt is not self.rt or self.table is None:
            self.rt = rt
            self.by_key = {}
            cap = rt.snapshot.capture if rt is not None else None
            self.table = CaptureTable(cap if cap is not None else Capture())
        return rt, self.table

    def get(self, key: tuple[str, ...], make: Callable[[], Listener]) -> Any:
        ctx = self.by_key.get(key)
        if ctx is None:
            ctx = type(self.parent)(self.sidecar, make())  # a ListenerContext, as the parent
            ctx.connections = self.parent.connections
            self.by_key[key] = ctx
        return ctx


class CaptureServer:
    """Accept loop of one capture listener (``inbound`` False: 15001, True: 15006)."""

    def __init__(self, sidecar: Any, ctx: Any, sock: socket.socket, inbound: bool) -> None:
        self.sidecar = sidecar
        self.ctx = ctx
        self.sock = sock
        self.inbound = inbound
        self.loop: asyncio.AbstractEventLoop = sidecar.loop
        self.contexts = _Contexts(sidecar, ctx)
        self.accepted = 0
        self.refused = 0
        self.last_refusal = ""
        self.decisions: dict[str, int] = {}  # sniffing outcomes (http1, http2, tls, tcp)
        self._pending: set[asyncio.Task[None]] = set()
        self.socks = [sock]
        six = _ipv6_twin(sock)
        if six is not None:
            self.socks.append(six)
        self._tasks = [self.loop.create_task(self._accept(s)) for s in self.socks]

    # ---------------------------------------------------------------- accept loop
    async def _accept(self, sock: socket.socket) -> None:
        loop = self.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if sock.fileno() < 0:
                    return
                log.warning("capture accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            t = loop.create_task(self._handle(conn))
            self._pending.add(t)
            t.add_done_callback(self._pending.discard)

    async def _handle(self, conn: socket.socket) -> None:
        try:
            try:
                ip, port = original_dst(conn)
            except OSError:
                ip, port = conn.getsockname()[:2]  # not redirected: dialled directly
            rt, table = self.contexts.refresh()
            if rt is None:
                self._refuse(conn, "no snapshot applied yet")
                return
            cap = table.capture
            if port in (cap.outbound_port, cap.inbound_port):
                self._refuse(conn, f"original destination {ip}:{port} is a capture port (loop)")
                return
            if self.inbound:
                await self._inbound(conn, rt, table, ip, port)
            else:
                await self._outbound(conn, rt, table, ip, port)
            self.accepted += 1
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:
            log.exception("capture: connection setup failed")
            conn.close()

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        self.refused += 1
        self.last_refusal = reason
        log.info("capture: connection refused: %s", reason)
        conn.close()

    def _count(self, kind: str) -> None:
        self.decisions[kind] = self.decisions.get(kind, 0) + 1

    def _sniffing(
        self, choose: Callable[[str], asyncio.Protocol], timeout: float
    ) -> ProtocolFactory:
        return lambda: Sniffer(choose, timeout, self.loop, self._count, self.ctx.connections)

    # ---------------------------------------------------------------- outbound (15001)
    async def _outbound(self, conn: socket.socket, rt: Any, table: CaptureTable, ip: str,
                        port: int) -> None:  # fmt: skip
        cap = table.capture
        svc = table.outbound(ip, port)
        c = self.contexts
        if svc is None:
            tcp_ctx = c.get(("out-tcp",), lambda: Listener(
                name="virtualOutbound", direction="tcp", cluster=""))  # fmt: skip
            if cap.outbound_traffic_policy == "REGISTRY_ONLY":
                target = TcpTarget(blackhole=True, special=BLACKHOLE, port=port, dst_ip=ip)
                log.info("capture: %s:%d is outside the registry: BlackHoleCluster "
                         "(outboundTrafficPolicy REGISTRY_ONLY)", ip, port)  # fmt: skip
            else:
                target = TcpTarget(passthrough=(ip, port), special=PASSTHROUGH, port=port,
                                   dst_ip=ip)  # fmt: skip
            await self.loop.connect_accepted_socket(lambda: TcpProxy(tcp_ctx, target), conn)
            return
        key = f"{svc.host}:{svc.port}"
        http_ctx = c.get(("out-http", key), lambda: Listener(
            name=f"outbound|{key}", direction="outbound", route_table="outbound",
            default_host=key, service_port=svc.port))  # fmt: skip
        tcp_ctx = c.get(("out-tcp", key), lambda: Listener(
            name=f"outbound|{key}", direction="tcp", cluster=svc.cluster,
            service_port=svc.port))  # fmt: skip

        def tcp() -> asyncio.Protocol:
            cluster = table.tcp_cluster(svc, ip, port, rt.rng)
            return TcpProxy(tcp_ctx, TcpTarget(cluster=cluster, port=port, dst_ip=ip))

        if svc.protocol == "tcp":
            await self.loop.connect_accepted_socket(tcp, conn)
            return

        def choose(kind: str) -> asyncio.Protocol:
            if kind in HTTP_KINDS:
                return _http_protocol(http_ctx)
            return tcp()  # TLS from the app (e.g. HTTPS) is proxied as TCP (see docs/tcp.md)

        await self.loop.connect_accepted_socket(
            self._sniffing(choose, cap.protocol_detection_timeout), conn
        )

    # ---------------------------------------------------------------- inbound (15006)
    async def _inbound(self, conn: socket.socket, rt: Any, table: CaptureTable, ip: str,
                       port: int) -> None:  # fmt: skip
        from diktyo.proxy.network.tls import InboundRefused, accept_inbound

        cap = table.capture
        c = self.contexts
        ib = table.inbound(port)
        factory: ProtocolFactory
        if ib is None:
            pctx = c.get(("in-pass",), lambda: Listener(
                name="inbound|passthrough", direction="tcp", cluster=""))  # fmt: skip
            target = TcpTarget(passthrough=("127.0.0.1", port), special=INBOUND_PASSTHROUGH,
                               port=port, dst_ip=ip)  # fmt: skip

            def factory() -> asyncio.Protocol:
                return TcpProxy(pctx, target)
        else:
            sp = ib.service_port or port
            http_ctx = c.get(("in-http", str(port)), lambda: Listener(
                name=f"inbound|{sp}", direction="inbound", cluster=ib.cluster,
                service_port=sp))  # fmt: skip
            tcp_ctx = c.get(("in-tcp", str(port)), lambda: Listener(
                name=f"inbound|{sp}", direction="tcp", cluster=ib.cluster,
                service_port=sp))  # fmt: skip

            def tcp() -> asyncio.Protocol:
                return TcpProxy(tcp_ctx, TcpTarget(cluster=ib.cluster, port=port, dst_ip=ip))

            if ib.protocol == "tcp":
                factory = tcp
            else:

                def choose(kind: str) -> asyncio.Protocol:
                    return _http_protocol(http_ctx) if kind in HTTP_KINDS else tcp()

                factory = self._sniffing(choose, cap.protocol_detection_timeout)
        certs = self.sidecar.certs
        if certs is None:
            await self.loop.connect_accepted_socket(factory, conn)
            return
        mode = rt.snapshot.security.peer_authn.mode_for(port)
        try:
            await accept_inbound(self.loop, conn, factory, mode, certs)
        except InboundRefused as exc:
            self.refused += 1
            self.last_refusal = str(exc)
            server = self.sidecar.stats.server
            server["downstream_cx_refused_peer_authn"] = (
                server.get("downstream_cx_refused_peer_authn", 0) + 1
            )
            log.info("inbound connection to port %d refused: %s", port, exc)

    # ---------------------------------------------------------------- server interface
    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for t in list(self._pending):
            t.cancel()
        for sock in self.socks:
            try:
                sock.close()
            except OSError:
                pass

    def is_serving(self) -> bool:
        return not self._tasks[0].done()


def _ipv6_twin(sock: socket.socket) -> socket.socket | None:
    """An IPv6-only socket on the same port beside a ``0.0.0.0`` capture listener, so
    connections redirected by ip6tables arrive too (their destination comes from
    ``IP6T_SO_ORIGINAL_DST``). IPv4 keeps its own socket: peers stay plain IPv4 addresses for
    policies and logs. None when the host has no IPv6."""
    host, port = sock.getsockname()[:2]
    if sock.family != socket.AF_INET or host != "0.0.0.0" or not socket.has_ipv6:
        return None
    six = socket.socket(socket.AF_INET6)
    try:
        six.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        six.bind(("::", port))
        six.listen(1024)
        six.setblocking(False)
    except OSError as exc:
        six.close()
        log.info("capture listener on port %d: IPv4 only (no IPv6: %s)", port, exc.strerror)
        return None
    return six


def serve_capture(sidecar: Any, ctx: Any, sock: socket.socket) -> CaptureServer:
    """Start a capture listener for ``ctx`` (direction ``capture_outbound`` / ``capture_inbound``)."""
    return CaptureServer(sidecar, ctx, sock, inbound=ctx.direction == "capture_inbound")

"""TCP proxying: bytes both ways between a downstream connection and one upstream host.

Used by explicit ``tcp`` listeners (``Listener.direction == "tcp"``: a per-upstream local port
or an inbound TCP port) and by the capture listeners (``diktyo.proxy.capture``), which pass a
``TcpTarget`` saying where the connection goes:

- a cluster (a registry service port, maybe chosen by a VirtualService ``tcp:`` route): a
  host from its load balancer, with auto mTLS to endpoints that have a sidecar;
- ``passthrough``: the original destination itself (Istio's ``PassthroughCluster`` for
  outbound traffic outside the registry under ALLOW_ANY, ``InboundPassthroughClusterIpv4``
  for inbound ports no service declares);
- ``blackhole``: refused (``BlackHoleCluster``, outboundTrafficPolicy REGISTRY_ONLY).

Inbound TCP connections (``reporter="destination"``) first pass the workload's
AuthorizationPolicies with Istio's TCP semantics (``diktyo.proxy.capture.tcp_authz``);
a denied connection is closed before any byte reaches the app.

Istio's TCP metrics (``istio_tcp_connections_opened_total``, ``..._closed_total``,
``istio_tcp_sent_bytes_total``, ``istio_tcp_received_bytes_total``) carry
``request_protocol="tcp"``; bytes are added on every maintenance tick and at close. Response
flags on close: ``UH`` no healthy upstream (also BlackHoleCluster), ``UF`` connect failure,
``UO`` the cluster's ``connectionPool.tcp.maxConnections`` reached (circuit breaker).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from diktyo.proxy.http.policies import LbContext
from diktyo.proxy.network.upstream import is_secure, open_upstream
from diktyo.snapshot.model import TcpRoute, WeightedCluster
from diktyo.telemetry.istio_metrics import PeerLabels, WorkloadInfo
from diktyo.telemetry.stats import UNKNOWN

log = logging.getLogger("diktyo.proxy")

PAUSE_BUFFER = 256 * 1024  # bytes buffered from downstream before the upstream is connected

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(text: str) -> Network:
    return ipaddress.ip_network(text, strict=False)


def _in_any(ip: str, nets: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in nets)


class CompiledTcpRoutes:
    """VirtualService ``tcp:`` rules of one service port (or one explicit TCP listener)."""

    __slots__ = ("rules",)

    def __init__(self, routes: Sequence[TcpRoute]) -> None:
        rules: list[tuple[tuple[tuple[int | None, tuple[Network, ...]], ...], TcpRoute]] = []
        for r in routes:
            matches = tuple(
                (m.port, tuple(_network(s) for s in m.destination_subnets)) for m in r.matches
            )
            rules.append((matches, r))
        self.rules = tuple(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, dst_ip: str, dst_port: int) -> TcpRoute | None:
        for matches, route in self.rules:
            if not matches:
                return route
            for port, nets in matches:
                if port is not None and port != dst_port:
                    continue
                if nets and not _in_any(dst_ip, nets):
                    continue
                return route
        return None

    def pick(self, dst_ip: str, dst_port: int, rng: random.Random) -> WeightedCluster | None:
        route = self.match(dst_ip, dst_port)
        if route is None or not route.clusters:
            return None
        return weighted_choice(route.clusters, rng)


def weighted_choice(clusters: Sequence[WeightedCluster], rng: random.Random) -> WeightedCluster:
    """One destination by weight (Istio: a lone destination without weight gets 100)."""
    if len(clusters) == 1:
        return clusters[0]
    total = sum(max(c.weight, 0) for c in clusters)
    if total <= 0:
        return clusters[0]
    x = rng.random() * total
    for c in clusters:
        x -= max(c.weight, 0)
        if x < 0:
            return c
    return clusters[-1]


@dataclass(frozen=True, slots=True)
class TcpTarget:
    """Where one TCP connection goes (see module docstring)."""

    cluster: str = ""
    passthrough: tuple[str, int] | None = None
    blackhole: bool = False
    special: str = ""  # PassthroughCluster / BlackHoleCluster / InboundPassthroughClusterIpv4
    port: int = 0  # destination (workload) port: AuthorizationPolicy ``ports``
    dst_ip: str = ""


class _Upstream(asyncio.Protocol):
    def __init__(self, down: TcpProxy) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        d = self.down
        d.sent += len(data)
        d.last_activity = time.monotonic()
        if d.transport is not None:
            d.transport.write(data)

    def eof_received(self) -> bool | None:
        d = self.down
        d.up_eof = True
        t = d.transport
        if d.down_eof or t is None or t.is_closing():
            d.close_both()
            return None
        if t.can_write_eof():
            t.write_eof()
            return True  # half-close: keep forwarding what the downstream still sends
        t.close()  # a TLS downstream cannot half-close
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()

    def pause_writing(self) -> None:
        if self.down.transport is not None:
            self.down.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.down.transport is not None:
            self.down.transport.resume_reading()


def _tcp_peer(rt: Any, reporter: str, cs: Any, host: Any, mtls: bool, principal: str,
              special: str) -> Any:  # fmt: skip
    """The interned TCP metric labels (Istio's, ``request_protocol="tcp"``)."""
    key = ("tcp", reporter, cs.cluster.name if cs is not None else special,
           host.key if host is not None else None, mtls, principal)  # fmt: skip
    p = rt.peers.get(key)
    if p is not None:
        return p
    service = cs.cluster.service if cs is not None else ""
    if reporter == "destination":
        src = WorkloadInfo.from_principal(principal) if principal else None
        labels = PeerLabels.build(
            "destination", src, rt.me, rt.inbound_service or service, "tcp", mtls
        )
    else:
        other = None
        if host is not None:
            ep = host.endpoint
            other = WorkloadInfo.from_labels(ep.workload, ep.namespace, ep.labels, ep.principal)
        labels = PeerLabels.build("source", rt.me, other, service, "tcp", mtls)
    if special:
        labels = dataclasses.replace(
            labels,
            destination_service=UNKNOWN,
            destination_service_name=special,
            destination_service_namespace=UNKNOWN,
        )
    p = rt.peers[key] = rt.stats.metrics.peer(labels)
    return p


def _tcp_authz(rt: Any) -> Any:
    """The runtime's AuthorizationPolicies compiled for TCP (once per snapshot)."""
    got = rt.__dict__.get("tcp_authz", False)
    if got is False:
        got = None
        sec = rt.snapshot.security
        if sec.authz:
            from diktyo.proxy.tcp_authz import TcpAuthz

            got = TcpAuthz(sec)
            if not got.enabled:
                got = None
        rt.tcp_authz = got
    return got


class TcpProxy(asyncio.Protocol):
    """Downstream side of one proxied TCP connection."""

    def __init__(self, ctx: Any, target: TcpTarget | None = None) -> None:
        self.ctx = ctx
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.buf: list[bytes] = []
        self.buffered = 0
        self.sent = 0  # bytes to the downstream (istio_tcp_sent_bytes_total)
        self.received = 0  # bytes from the downstream (istio_tcp_received_bytes_total)
        self.reported = (0, 0)
        self.peer_key: Any = None
        self.host: Any = None
        self.cstate: Any = None
        self.closed = False
        self.flags = "-"
        self.last_activity = time.monotonic()
        self.breaker: Any = None  # the cluster's circuit breaker while a connection counts
        self.down_eof = False  # the downstream sent FIN
        self.up_eof = False  # the upstream sent FIN

    # ---------------------------------------------------------------- setup
    def _default_target(self, rt: Any, transport: asyncio.BaseTransport) -> TcpTarget:
        ctx = self.ctx
        lst: Any = ctx.listener
        routes = lst.tcp_routes
        cluster = ctx.cluster
        if routes:
            compiled = rt.__dict__.setdefault("tcp_routes", {}).get(lst.name)
            if compiled is None:
                compiled = rt.tcp_routes[lst.name] = CompiledTcpRoutes(routes)
            wc = compiled.pick("", ctx.service_port, rt.rng)
            if wc is not None:
                cluster = wc.cluster
        sock = transport.get_extra_info("sockname")
        return TcpTarget(cluster=cluster, port=ctx.service_port, dst_ip=sock[0] if sock else "")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        rt = ctx.runtime()
        target = self.target or self._default_target(rt, transport)
        self.target = target
        inbound = ctx.reporter == "destination"
        principal = ""
        if inbound:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                from diktyo.proxy.filters.inbound import connection_peer

                principal = connection_peer(self)[0]
            authz = _tcp_authz(rt)
            if authz is not None:
                peer = transport.get_extra_info("peername")
                decision = authz.check(target.port, principal, peer[0] if peer else "",
                                       target.dst_ip)  # fmt: skip
                if not decision.allowed:
                    server = ctx.stats.server
                    server["downstream_cx_rbac_denied"] = (
                        server.get("downstream_cx_rbac_denied", 0) + 1
                    )
                    log.info(
                        "TCP connection to port %d from %s refused: %s",
                        target.port, principal or (peer[0] if peer else "?"), decision.reason,
                    )  # fmt: skip
                    self.closed = True
                    cast(asyncio.Transport, transport).abort()
                    return
        mtls_down = bool(principal)
        if target.blackhole or target.passthrough is not None:
            self.peer_key = _tcp_peer(rt, ctx.reporter, None, None, mtls_down, principal,
                                      target.special)  # fmt: skip
            rt.stats.metrics.tcp_open(self.peer_key)
            if target.blackhole:
                self.flags = "UH"
                transport.close()
                return
            self._spawn(rt, self._connect(rt, None, None, target.passthrough))
            return
        cs = self.cstate = rt.clusters.get(target.cluster)
        host = cs.pick_host(LbContext({}, "", None)) if cs is not None else None
        if host is None or not cs.breaker.can_open_connection():
            if cs is not None:
                self.peer_key = _tcp_peer(rt, ctx.reporter, cs, None, mtls_down, principal, "")
                rt.stats.metrics.tcp_open(self.peer_key)
                self.flags = "UH"
                if host is not None:  # connectionPool.tcp.maxConnections reached (Envoy: UO)
                    self.flags = "UO"
                    rt.stats.inc_cluster(cs.cluster.name, "upstream_cx_overflow")
                    log.info("TCP connection to %s refused: %s", cs.cluster.name,
                             cs.breaker.overflow_message("connections"))  # fmt: skip
            transport.close()
            return
        self.host = host
        self.breaker = cs.breaker
        cs.breaker.connection_opened()
        rt.stats.inc_cluster(cs.cluster.name, "upstream_cx_total")
        cs.on_request_start(host)
        mtls = mtls_down if inbound else is_secure(cs.cluster.tls, host.endpoint, rt.sidecar.certs)
        self.peer_key = _tcp_peer(rt, ctx.reporter, cs, host, mtls, principal, "")
        rt.stats.metrics.tcp_open(self.peer_key)
        self._spawn(rt, self._connect(rt, cs, host, None))

    @staticmethod
    def _spawn(rt: Any, coro: Any) -> None:
        task = rt.loop.create_task(coro)
        rt.sidecar.tasks.add(task)
        task.add_done_callback(rt.sidecar.tasks.discard)

    async def _connect(self, rt: Any, cs: Any, host: Any, direct: tuple[str, int] | None) -> None:
        try:
            if direct is not None:
                async with asyncio.timeout(10.0):  # Istio's default connectTimeout
                    _, up = await open_upstream(
                        rt.loop, direct[0], direct[1], None, lambda: _Upstream(self)
                    )
            else:
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
        except (OSError, TimeoutError) as exc:
            where = f"{direct[0]}:{direct[1]}" if direct else f"{host.address}:{host.port}"
            log.info("TCP upstream %s: connect failed: %s", where, str(exc) or type(exc).__name__)
            self.flags = "UF"
            if cs is not None:
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
            self.buffered = 0
            if self.transport is not None and not self.down_eof:
                self.transport.resume_reading()
        if self.down_eof:
            self._forward_eof(up)

    # ---------------------------------------------------------------- data
    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.last_activity = time.monotonic()
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            self.buf.append(data)
            self.buffered += len(data)
            if self.buffered > PAUSE_BUFFER and self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.down_eof = True
        if self.up_eof:
            self.close_both()
            return None
        up = self.up
        if up is not None:
            self._forward_eof(up)
        if self.transport is not None and self.transport.get_extra_info("ssl_object") is not None:
            return None  # TLS (close_notify) cannot half-close: the transport closes
        return True  # half-close: keep sending the upstream's answer (or connect first)

    def _forward_eof(self, up: _Upstream) -> None:
        t = up.transport
        if t is None or t.is_closing():
            return
        if t.can_write_eof():
            t.write_eof()
        else:
            t.close()  # a TLS upstream cannot half-close: close_notify after what is buffered

    def close_both(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def _report_bytes(self) -> None:
        if self.peer_key is None:
            return
        sent, received = self.sent, self.received
        ds, dr = sent - self.reported[0], received - self.reported[1]
        if ds or dr:
            self.ctx.stats.metrics.tcp_bytes(self.peer_key, ds, dr)
            self.reported = (sent, received)

    def idle_check(self, now: float, header_timeout: float, idle_timeout: float) -> None:
        """Maintenance tick: report bytes so far (Istio reports TCP bytes periodically) and
        close a connection idle for longer than the cluster's ``tcp.idleTimeout`` (1 h)."""
        self._report_bytes()
        cs = self.cstate
        limit = cs.cluster.pool.idle_timeout if cs is not None else 3600.0
        if limit and now - self.last_activity > limit and self.transport is not None:
            log.info("TCP connection idle for %.0f s: closed (tcp.idleTimeout)", limit)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        already = self.closed
        self.closed = True
        self.ctx.connections.discard(self)
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()
        if self.peer_key is not None and not already:
            self._report_bytes()
            self.ctx.stats.metrics.tcp_close(self.peer_key, self.flags)
        if self.host is not None and self.cstate is not None:
            self.cstate.on_request_end(self.host, 200, False)
            self.host = None
        if self.breaker is not None:
            self.breaker.connection_closed()
            self.breaker = None

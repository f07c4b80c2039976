"""The sidecar: applies snapshots atomically, owns listeners, pools, stats and the 1 s maintenance tick.

Theory of operation
-------------------
``Sidecar.apply(snapshot)`` compiles everything a snapshot needs into a ``Runtime`` (route
matchers, cluster states carried over from the previous runtime with ``previous=``, listener
sockets bound up front); if any step fails it raises ``SnapshotError`` and the old runtime keeps
serving. Then it swaps ``self.rt`` in one assignment. A stream captures the runtime when it
starts, so requests in flight finish on the objects they started with. Connection pools are
keyed by cluster name and survive swaps (their ``state`` is replaced). Listener changes: new
names are bound, removed names stop accepting, and a listener with the same name, direction
and (non-zero) port keeps its socket and gets the new settings.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from diktyo.core.clock import SYSTEM_CLOCK, Clock, make_random
from diktyo.core.regex import check_all
from diktyo.proxy.http.connection_manager import RequestIds
from diktyo.proxy.http.policies import ClusterState
from diktyo.proxy.http.sniffer import DownstreamSniffer
from diktyo.proxy.network.listener import bind_listener, serve
from diktyo.proxy.network.pool import ConnectionPool, new_pool, upstream_protocol
from diktyo.proxy.router.matcher import RouteMatcher
from diktyo.proxy.stats import Stats
from diktyo.security.spiffe import SpiffeId
from diktyo.snapshot.codec import SnapshotError, validate
from diktyo.snapshot.model import Listener, Snapshot
from diktyo.telemetry.istio_metrics import WorkloadInfo

log = logging.getLogger("diktyo.proxy")

HEADER_TIMEOUT = 30.0  # from a request head's first byte to its end (--header-timeout)
IDLE_TIMEOUT = 300.0


def _drain_reason(old: Any, new: Any) -> str:
    """Which settings that pooled connections were made under differ ("" = none)."""
    what = [f for f in ("tls", "pool", "protocol") if getattr(old, f) != getattr(new, f)]
    return ", ".join(what)


class ListenerContext:
    """Per-listener settings read by connections (updated in place on snapshot swaps)."""

    def __init__(self, sidecar: Sidecar, listener: Listener) -> None:
        self.sidecar = sidecar
        self.stats = sidecar.stats
        self.connections: set[Any] = set()
        self.server: Any = None  # asyncio.AbstractServer, or listener.InboundServer with mTLS
        self.sock: socket.socket | None = None
        self.port = 0
        self.update(listener)

    def update(self, listener: Listener) -> None:
        self.listener = listener
        self.name = listener.name
        self.direction = listener.direction
        self.route_table = listener.route_table
        self.cluster = listener.cluster
        self.default_host = listener.default_host
        self.service_port = listener.service_port
        inbound = listener.direction == "inbound" or listener.name.startswith("inbound|")
        self.reporter = "destination" if inbound else "source"

    def runtime(self) -> Runtime:
        return self.sidecar.rt  # type: ignore[return-value]

    def port_for(self, authority: str) -> int | None:
        i = authority.rfind(":")
        if i > 0 and authority[i + 1 :].isdigit():
            return int(authority[i + 1 :])
        return self.service_port or None


class Runtime:
    """Everything compiled from one snapshot."""

    clusters: dict[str, ClusterState]  # read from ``previous`` before this one's are built

    def __init__(self, snapshot: Snapshot, sidecar: Sidecar, previous: Runtime | None) -> None:
        problems = validate(snapshot)
        if problems:
            raise SnapshotError("invalid snapshot: " + "; ".join(problems))
        self.snapshot = snapshot
        self.loop = sidecar.loop
        self.clock = sidecar.clock
        self.rng = sidecar.rng
        self.stats = sidecar.stats
        self.request_ids = sidecar.request_ids
        self.record = sidecar.stats.record  # IstioMetrics.record(peer, code, flags, ms, rq, rs)
        self.pools = sidecar.pools  # cluster name -> ClusterPool (survives swaps)
        self.sidecar = sidecar
        # regexes compile on first use; all the tables' are validated here at once (one
        # child process while RE2 is not loaded: diktyo.core.regex.check_all; issue 11)
        matchers = {t.name: RouteMatcher(t, check=False) for t in snapshot.route_tables}
        check_all([rx for m in matchers.values() for rx in m.regexes()])
        for name, m in matchers.items():
            try:
                m.check()  # the verdicts are known now: no second validation
            except ValueError as exc:
                raise SnapshotError(f"route table {name!r}: {exc}") from None
        self.matchers = matchers
        self.filter_chains: dict[str, Any] = {}  # listener direction -> FilterChain
        node = snapshot.node
        principal = SpiffeId(node.trust_domain, node.namespace, node.service_account).uri
        self.me = WorkloadInfo.from_labels(node.workload, node.namespace, node.labels, principal)
        self.inbound_service = node.services[0] if node.services else ""
        self.access_log: Callable[..., None] | None = None
        if snapshot.telemetry is not None:  # the Telemetry API for this workload
            from diktyo.proxy.access_log import make_policy_logger

            cfg = snapshot.mesh.access_log
            tel = snapshot.telemetry
            try:
                on = tel.client_access_log.enabled or tel.server_access_log.enabled
                writer = sidecar.access_log_writer(cfg.path) if on else None
                self.access_log = make_policy_logger(cfg, tel, writer)
            except ValueError as exc:
                raise SnapshotError(f"telemetry access log filter: {exc}") from None
            except OSError as exc:
                raise SnapshotError(f"access log {cfg.path}: {exc.strerror}") from None
        elif snapshot.mesh.access_log.enabled:
            from diktyo.proxy.access_log import make_access_logger

            cfg = snapshot.mesh.access_log
            try:
                writer = sidecar.access_log_writer(cfg.path)
            except OSError as exc:
                raise SnapshotError(f"access log {cfg.path}: {exc.strerror}") from None
            self.access_log = make_access_logger(cfg, writer)
        self.peers: dict[tuple[Any, ...], Any] = {}
        # security: inbound checks (mTLS peer, JWT, RBAC) and the peer metadata we send
        certs = sidecar.certs
        self.peer_header: str | None = self.me.encode() if certs is not None else None
        self.inbound_guard: Any = None
        self.gateway_guard: Any = None  # gateways: only when policies select them
        sec = snapshot.security
        gateway = node.mode == "gateway"
        if (certs is not None and not gateway) or sec.authz or sec.jwt_rules:
            from diktyo.proxy.filters.inbound import InboundGuard
            from diktyo.security.http_client import fetch_jwks

            try:
                guard = InboundGuard(
                    self, sec, principal if certs is not None else "", fetch_jwks,
                    telemetry=not gateway,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a bad policy rejects the snapshot whole
                raise SnapshotError(f"security: {type(exc).__name__}: {exc}") from None
            if gateway:
                self.gateway_guard = guard
            else:
                self.inbound_guard = guard
        # tracing: only with a collector; the exporter is started/reused when applied
        self.tracer: Any = None
        self.new_exporter: Any = None
        tracing = snapshot.mesh.tracing
        endpoint = tracing.otlp_endpoint
        if endpoint and endpoint.startswith("/"):  # a path on the control plane
            cp = sidecar.control_plane
            if cp is None:
                log.warning(
                    "mesh.tracing.otlp_endpoint %r is a path on the control plane, and this "
                    "sidecar has none (--snapshot / --config): spans are not exported; give an "
                    "http://host:port/v1/traces URL to export them",
                    endpoint,
                )
                endpoint = None
            else:
                endpoint = cp.url + endpoint
        if endpoint:
            from diktyo.telemetry.otlp import OtlpExporter

            try:
                self.new_exporter = OtlpExporter(
                    endpoint, service_name=f"{node.workload}.{node.namespace}"
                )
            except ValueError as exc:
                raise SnapshotError(
                    f"mesh.tracing.otlp_endpoint: {exc}"
                ) from None  # (reporter, cluster, host key) -> PeerKey
        # cluster states last: carrying over mutates shared objects (hosts, breakers)
        prev = previous.clusters if previous is not None else {}
        clusters: dict[str, Any] = {}
        mesh = snapshot.mesh
        try:
            for c in snapshot.clusters:
                clusters[c.name] = ClusterState(
                    c,
                    self.clock,
                    self.rng,
                    previous=prev.get(c.name),
                    retry_budget_percent=mesh.retry_budget_percent,
                    retry_budget_min=mesh.retry_budget_min,
                )
        except Exception as exc:  # noqa: BLE001 - any failure rejects the snapshot whole
            raise SnapshotError(f"cluster state: {type(exc).__name__}: {exc}") from None
        self.clusters = clusters

    def pool_for(self, cstate: Any) -> ConnectionPool:
        return self.sidecar.pools[cstate.cluster.name]

    def labels_for(self, reporter: str, cstate: Any, host: Any, protocol: str = "http") -> Any:
        key: tuple[Any, ...] = (
            reporter,
            cstate.cluster.name if cstate is not None else "",
            host.key if host is not None else None,
        )
        if protocol != "http":
            key += (protocol,)
        p = self.peers.get(key)
        if p is not None:
            return p
        if reporter == "destination":
            service = self.inbound_service or (cstate.cluster.service if cstate else "")
            p = self.stats.peer_for("destination", self.me, None, service, protocol)
        else:
            other = None
            service = ""
            if cstate is not None:
                service = cstate.cluster.service
            if host is not None:
                ep = host.endpoint
                other = WorkloadInfo.from_labels(ep.workload, ep.namespace, ep.labels, ep.principal)
            p = self.stats.peer_for("source", self.me, other, service, protocol)
        self.peers[key] = p
        return p


class Sidecar:
    """One sidecar process' data plane."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Clock = SYSTEM_CLOCK,
        seed: int | None = None,
        bind_address: str | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.clock = clock
        self.rng = make_random(seed)
        self.stats = Stats()
        self.request_ids = RequestIds(self.rng)
        self.rt: Runtime | None = None
        self.listeners: dict[str, ListenerContext] = {}
        self.pools: dict[str, ConnectionPool] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.bind_address = bind_address
        self.draining = False
        self.stopped = asyncio.Event()
        self._ticker: asyncio.TimerHandle | None = None
        self.exporter: Any = None  # OtlpExporter while tracing is configured
        self.control_plane: Any = None  # the ConfigClient feeding snapshots (its .url), if any
        self.applied = 0
        self.rejected = 0
        self.last_error = ""
        # workload identity (mTLS): a CertificateStore once the CA issued a certificate
        self.certs: Any = None
        self.rotator: Any = None
        self.header_timeout = HEADER_TIMEOUT
        self.log_writers: dict[str, Any] = {}  # access log path -> AccessLogWriter
        self.access_log_buffer = 1024 * 1024  # bytes buffered for a slow reader, then drops
        # Envoy's (and Istio's) default: HTTP/1.0 requests are answered 426 (--accept-http-10)
        self.accept_http_10 = False
        self.idle_timeout = IDLE_TIMEOUT
        # where listener sockets come from: bound here, or (a worker process) handed over by
        # the leader (diktyo.proxy.workers); (listener name, address, port) -> socket
        self.listener_socket: Callable[[str, str, int], socket.socket] = (
            lambda name, address, port: bind_listener(address, port)
        )
        self.on_drain: list[Callable[[float], None]] = []  # told when draining starts
        self.workers: Any = None  # diktyo.proxy.workers.Workers with concurrency > 1

    def access_log_writer(self, path: str) -> Any:
        """The one non-blocking writer for an access log path (kept across snapshot swaps)."""
        w = self.log_writers.get(path)
        if w is None:
            from diktyo.proxy.access_log import AccessLogWriter

            w = self.log_writers[path] = AccessLogWriter(
                self.loop, path, self.stats.server, self.access_log_buffer
            )
        return w

    # ------------------------------------------------------------------ snapshots
    def apply(self, snapshot: Snapshot) -> None:
        """Apply ``snapshot`` whole or raise SnapshotError and keep the old one."""
        if self.draining:  # its listeners are closed: binding or swapping now would be wrong
            raise SnapshotError(
                f"snapshot {snapshot.version or '?'} not applied: the sidecar is draining "
                "(shutting down)"
            )
        try:
            new_socks = self._bind_new_listeners(snapshot)
        except SnapshotError as exc:
            self.rejected += 1
            self.last_error = str(exc)
            self.stats.families["config_rejects"].inc()
            raise
        try:
            rt = Runtime(snapshot, self, self.rt)
        except SnapshotError as exc:
            for s in new_socks.values():
                s.close()
            self.rejected += 1
            self.last_error = str(exc)
            self.stats.families["config_rejects"].inc()
            raise
        # -- commit (nothing below may fail)
        for name, cs in rt.clusters.items():
            pool = self.pools.get(name)
            if pool is not None and pool.protocol != upstream_protocol(cs.cluster):
                # HTTP/1.1 <-> HTTP/2 (port protocol or h2UpgradePolicy changed): a new pool;
                # streams in flight finish on the old one, which then closes its connections
                self.pools.pop(name).retire()
                pool = None
            if pool is None:
                pool = self.pools[name] = new_pool(name, cs, self.loop, self.stats, self.tasks)
                pool.certs = self.certs
            else:
                before = pool.state.cluster
                pool.state = cs
                pool.prune({h.key for h in cs.hosts})
                changed = _drain_reason(before, cs.cluster)
                if changed:
                    n = pool.drain(changed)
                    log.info(
                        "cluster %s: %s changed, %d pooled connections drained", name, changed, n
                    )
                if self.certs is not None or cs.cluster.tls is not None:
                    self._retune_tls(pool, cs)
        for name in list(self.pools):
            if name not in rt.clusters:
                self.pools.pop(name).retire()
        self._apply_tracing(rt)
        tel = snapshot.telemetry
        self.stats.metrics.overrides = tel.metrics if tel is not None else ()
        self.rt = rt
        guard = rt.inbound_guard or rt.gateway_guard
        if guard is not None and guard.security.jwt.enabled:
            self._spawn(self._prefetch_jwks(guard))
        wanted = {lst.name: lst for lst in snapshot.listeners}
        for name in list(self.listeners):
            if name not in wanted:
                gone = self.listeners.pop(name)
                if gone.server is not None:
                    gone.server.close()
        for name, lst in wanted.items():
            ctx = self.listeners.get(name)
            if ctx is not None and name not in new_socks:
                ctx.update(lst)
                continue
            if ctx is not None and ctx.server is not None:
                ctx.server.close()  # same name, new address/port/direction: replaced
            ctx = ListenerContext(self, lst)
            sock = new_socks[name]
            ctx.sock = sock
            ctx.port = sock.getsockname()[1]
            self.listeners[name] = ctx
            self._serve(ctx, sock)
        self.applied += 1
        self.stats.families["config_pushes"].inc()
        if self._ticker is None:
            self._ticker = self.loop.call_later(1.0, self._tick)
        log.info(
            "applied snapshot %s (%d listeners, %d clusters)",
            snapshot.version,
            len(snapshot.listeners),
            len(snapshot.clusters),
        )

    def _apply_tracing(self, rt: Runtime) -> None:
        new = rt.new_exporter
        old = self.exporter
        if new is None:
            if old is not None:
                self._spawn(old.close())
                self.exporter = None
            return
        if old is None or old.endpoint != new.endpoint:
            if old is not None:
                self._spawn(old.close())
            new.start()
            self.exporter = new
        from diktyo.proxy.http.tracer import Tracer

        rt.tracer = Tracer(
            rt.snapshot.mesh.tracing.sampling,
            self.rng,
            self.clock,
            self.exporter,
            rt.snapshot.node.id,
            rt.snapshot.telemetry,
            rt.snapshot.node,
            rt.snapshot.mesh.trust_domain,
        )

    def _retune_tls(self, pool: ConnectionPool, cs: Any) -> None:
        """Plaintext and mTLS connections don't mix: drop those whose TLS-ness changed."""
        from diktyo.proxy.network.upstream import is_secure

        tls = cs.cluster.tls
        want = {h.key: is_secure(tls, h.endpoint, self.certs) for h in cs.hosts}
        pool.retune_tls(want.get)

    async def _prefetch_jwks(self, guard: Any) -> None:
        try:
            await guard.security.prefetch()
        except Exception:
            log.exception("fetching JWKS failed")

    def peer_authn_mode(self, ctx: ListenerContext) -> str:
        """PeerAuthentication mode for a new connection on inbound listener ``ctx``."""
        rt = self.rt
        if rt is None:
            return "PERMISSIVE"
        return rt.snapshot.security.peer_authn.mode_for(ctx.service_port or 0)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background; ``stop()`` cancels it (filters' async checks)."""
        self._spawn(coro)

    def _bind_new_listeners(self, snapshot: Snapshot) -> dict[str, socket.socket]:
        socks: dict[str, socket.socket] = {}
        try:
            for lst in snapshot.listeners:
                cur = self.listeners.get(lst.name)
                # capture listeners bind where iptables redirects to (0.0.0.0), never elsewhere
                capture = lst.direction.startswith("capture_")
                address = lst.address if capture else (self.bind_address or lst.address)
                if (
                    cur is not None
                    and cur.direction == lst.direction
                    and (lst.port == 0 or lst.port == cur.port)
                    and cur.sock is not None
                    and address == cur.sock.getsockname()[0]
                ):
                    continue
                try:
                    sock = self.listener_socket(lst.name, address, lst.port)
                except OSError as exc:
                    raise SnapshotError(
                        f"listener {lst.name!r}: cannot bind {lst.address}:{lst.port}: "
                        f"{exc.strerror or exc}; free the port or pick another one"
                    ) from None
                socks[lst.name] = sock
        except SnapshotError:
            for s in socks.values():
                s.close()
            raise
        return socks

    def _serve(self, ctx: ListenerContext, sock: socket.socket) -> None:
        if ctx.direction.startswith("capture_"):  # 15001 / 15006 (diktyo.proxy.capture)
            from diktyo.proxy.capture.server import serve_capture

            ctx.server = serve_capture(self, ctx, sock)
            return
        if ctx.direction == "tcp":
            from diktyo.proxy.tcp_proxy import TcpProxy

            def factory() -> asyncio.Protocol:
                return TcpProxy(ctx)
        else:

            def factory() -> asyncio.Protocol:
                # HTTP/1.1 or HTTP/2 (h2c prior knowledge, ALPN h2): decided per connection
                return DownstreamSniffer(ctx)

        inbound = ctx.direction == "inbound" or (
            ctx.direction == "tcp" and ctx.listener.name.startswith("inbound|")
        )
        if inbound and self.certs is not None:
            from diktyo.proxy.network.listener import serve_inbound

            def mode() -> str:
                return self.peer_authn_mode(ctx)

            def refused(reason: str) -> None:
                self.stats.server["downstream_cx_refused_peer_authn"] = (
                    self.stats.server.get("downstream_cx_refused_peer_authn", 0) + 1
                )

            self.certs.inbound_stats = self.stats.listener  # envoy_listener_ssl_* counters
            ctx.server = serve_inbound(self.loop, sock, factory, mode, self.certs, refused)
            return

        async def start() -> None:
            ctx.server = await serve(self.loop, sock, factory, ssl=self.server_ssl(ctx.listener))

        task = self.loop.create_task(start())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def server_ssl(self, listener: Listener) -> Any:
        """TLS seam: the server SSLContext for ``listener`` (None = plaintext)."""
        return None

    async def wait_listening(self) -> None:
        """Wait until every listener's server is started."""
        for _ in range(200):
            if all(c.server is not None for c in self.listeners.values()):
                return
            await asyncio.sleep(0.005)

    def ports(self) -> dict[str, int]:
        return {name: ctx.port for name, ctx in self.listeners.items()}

    # ------------------------------------------------------------------ maintenance
    def _tick(self) -> None:
        self._ticker = None
        if self.stopped.is_set():
            return
        try:
            rt = self.rt
            if rt is not None:
                for cs in rt.clusters.values():
                    cs.tick()
            now_loop = self.loop.time()
            for pool in self.pools.values():
                pool.sweep(now_loop)
            now = time.monotonic()
            for ctx in self.listeners.values():
                for conn in list(ctx.connections):
                    check = getattr(conn, "idle_check", None)
                    if check is not None:
                        check(now, self.header_timeout, self.idle_timeout)
        except Exception:
            log.exception("sidecar maintenance tick failed")
        self._ticker = self.loop.call_later(1.0, self._tick)

    def active_connections(self) -> int:
        return sum(len(c.connections) for c in self.listeners.values())

    async def drain(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then stop."""
        if self.draining:
            await self.stopped.wait()
            return
        self.draining = True
        for hook in self.on_drain:
            hook(timeout)
        for ctx in self.listeners.values():
            if ctx.server is not None:
                ctx.server.close()
            for conn in list(ctx.connections):
                if hasattr(conn, "streams"):
                    conn.close_after = True
                    if not conn.streams and conn.transport is not None:
                        conn.transport.close()
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline and self.active_connections():
            await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for w in self.log_writers.values():
            w.flush_and_close()  # best effort, still non-blocking
        self.log_writers.clear()
        for ctx in self.listeners.values():
            if ctx.server is not None:
                ctx.server.close()
            for conn in list(ctx.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        for pool in self.pools.values():
            pool.close_all()
            for c in list(pool.active):
                c.close()
        if self.exporter is not None:
            exporter, self.exporter = self.exporter, None
            try:
                await asyncio.wait_for(exporter.close(), 5)
            except (TimeoutError, OSError):
                pass
        cur = asyncio.current_task()
        others = [t for t in self.tasks if t is not cur]
        for t in others:
            t.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self.stopped.set()


def install_uvloop() -> None:
    """Use uvloop as the event loop implementation when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        print("diktyo: uvloop not installed, using the stdlib loop", file=sys.stderr)
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

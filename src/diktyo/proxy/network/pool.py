"""Upstream connection pools: one per cluster, idle connections per host key, MRU reuse, breaker-aware.

``ConnectionPool`` is the interface the connection manager uses; ``new_pool`` picks the
implementation from ``upstream_protocol(cluster)``. ``Http1Pool`` is the HTTP/1.1 one.

Theory of operation
-------------------
``Http1Pool.acquire(requester, host)`` gives ``requester`` (an upstream attempt or a mirror
copy) a connection to ``host``:

1. the most recently used idle connection to that host, if any (``stream.attach(conn)`` at
   once; ``conn.reused`` is True, which lets the stream retry the keep-alive race);
2. otherwise the request becomes *pending* (Envoy semantics: every request without a ready
   connection is pending, also while its new connection is being established). If the
   breaker refuses a pending slot the stream gets ``stream.overflow(message)`` -> 503 ``UO``;
3. a new connection is opened when the breaker allows one more; when it is up the first
   pending request for that host gets it. Otherwise the request waits until a connection of
   the cluster is released or closed - unless the pool has no connection at all to that host
   (none connecting, busy or idle), whoever holds the cluster's limit (other hosts, other
   workers): then, as Envoy's pool does "to prevent pending streams being queued to this upstream with
   no way to be processed", one is opened anyway, past ``maxConnections``
   (``upstream_cx_overflow`` still counts the refusal). Envoy applies that rule per worker
   thread (each has its own pools) and so does each of diktyo's worker processes: with N
   workers up to N connections to a single host at ``maxConnections: 1``, within Envoy's
   documented bound ``maxConnections + endpoints x pools`` (docs/tasks.md, Circuit breaking).

Connections are counted against the breaker of the cluster state *current at close time*
(``ClusterPool.state`` is replaced on snapshot swaps; the pool object survives them).
Idle connections expire after ``cluster.pool.idle_timeout`` (swept by ``sweep``), at most
``MAX_IDLE_PER_HOST`` are kept, and ``max_requests_per_connection`` closes a connection after
that many requests.

When a snapshot changes a cluster's TLS or connection-pool settings, ``drain`` retires every
connection made under the old ones (Envoy drains a cluster's pools on a cluster update): idle
connections close at once, busy ones when their request is done, and connections still being
established serve the request they were opened for and then close.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from diktyo.proxy.network.upstream import Requester, UpstreamConnection, dial

if TYPE_CHECKING:
    from diktyo.proxy.upstream.cluster import ClusterState

MAX_IDLE_PER_HOST: Final = 64
log = logging.getLogger("diktyo.proxy")


HTTP1 = "HTTP/1.1"
HTTP2 = "HTTP/2"


def upstream_protocol(cluster: Any) -> str:
    """The protocol the sidecar speaks to a cluster's endpoints: the one place that reads
    ``Cluster.protocol`` (``http``, ``http2``, ``grpc``; ``tcp`` clusters have no HTTP pool).

    Translation decides it per Istio (``Cluster.upstream_protocol``: HTTP/2 for http2/grpc/
    grpc-web ports and ``h2UpgradePolicy: UPGRADE``); ``protocol`` is the fallback for
    snapshots written without that field.
    """
    up = getattr(cluster, "upstream_protocol", HTTP1)
    if up == HTTP2 or getattr(cluster, "protocol", "http") in ("http2", "grpc"):
        return HTTP2
    return HTTP1


class ConnectionPool(Protocol):
    """The interface of an upstream connection pool (one per cluster, survives snapshot swaps).

    ``acquire(requester, host, fresh)`` eventually calls exactly one of ``requester.attach(conn)``,
    ``requester.overflow(message)`` (503 UO) or ``requester.connect_failed(reason)`` - unless
    ``cancel(requester)`` came first. ``release(conn)`` gives back what ``attach`` handed out
    once the requester's stream is done with it. An HTTP/1.1 pool hands each connection to one
    requester at a time; a multiplexed (HTTP/2) pool hands the same connection to up to its
    per-connection stream limit, and counts the requests, not the connections, against the
    circuit breaker (``http2MaxRequests``), as Envoy does.
    """

    name: str
    protocol: str
    state: Any  # ClusterState of the current snapshot
    certs: Any
    active: set[Any]

    def acquire(self, stream: Any, host: Any, fresh: bool = False) -> None: ...
    def cancel(self, stream: Any) -> None: ...
    def release(self, conn: Any) -> None: ...
    def sweep(self, now: float) -> None: ...
    def prune(self, keys: set[tuple[str, int]]) -> None: ...
    def retune_tls(self, secure_for: Any) -> None: ...
    def drain(self, reason: str) -> int: ...
    def retire(self) -> None: ...
    def close_all(self) -> None: ...


def new_pool(
    name: str,
    state: Any,
    loop: asyncio.AbstractEventLoop,
    stats: Any,
    tasks: set[asyncio.Task[Any]],
) -> ConnectionPool:
    """The pool for a cluster, by ``upstream_protocol``."""
    if upstream_protocol(state.cluster) == HTTP2:
        from diktyo.proxy.network.h2pool import H2ClusterPool

        return H2ClusterPool(name, state, loop, stats, tasks)
    return Http1Pool(name, state, loop, stats, tasks)


class Http1Pool:
    """All HTTP/1.1 upstream connections of one cluster: one request per connection at a time."""

    def __init__(
        self,
        name: str,
        state: Any,
        loop: asyncio.AbstractEventLoop,
        stats: Any,
        tasks: set[asyncio.Task[Any]],
    ) -> None:
        self.protocol = HTTP1  # (set here: mypyc leaves a class-level default unset)
        self.name = name
        self.state = state
        self.loop = loop
        self.stats = stats
        self.tasks = tasks
        self.idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.pending: deque[tuple[Any, Any]] = deque()  # (stream, host)
        self.connecting = 0
        self.per_host: dict[tuple[str, int], int] = {}  # connecting + open, by host key
        self.active: set[UpstreamConnection] = set()
        self.retired = False  # the cluster left the snapshot: close connections as they free up
        self.certs: Any = None  # the sidecar's CertificateStore (auto mTLS), None = no identity
        self.generation = 0  # bumped by drain(): connections of an older one are not reused

    # -- acquiring
    def acquire(self, stream: Any, host: Any, fresh: bool = False) -> None:
        if not fresh:
            idle = self.idle.get(host.key)
            while idle:
                conn = idle.pop()
                if conn.closed:
                    continue
                conn.reused = True
                conn.requests += 1  # self._hand(conn, stream) inlined (hot path)
                conn.stream = stream
                conn.codec.sink = stream
                if isinstance(stream, Requester):  # the upstream attempt: a native call
                    stream.attach(conn)
                else:
                    stream.attach(conn)
                return
        breaker = self.state.breaker
        if not breaker.try_enter_pending():
            self.stats.inc_cluster(self.name, "upstream_rq_pending_overflow")
            stream.overflow(breaker.overflow_message("pending"))
            return
        self.pending.append((stream, host))
        if breaker.can_open_connection():
            self._open(host)
            return
        self.stats.inc_cluster(self.name, "upstream_cx_overflow")
        if not self.per_host.get(host.key):
            # Envoy: a host picked by the load balancer always gets one connection in this
            # pool, even past maxConnections (held by other hosts, or by other workers' pools)
            self._open(host)
        elif not fresh:
            # a connection of another host may be idle: close it to make room
            for key, conns in self.idle.items():
                if conns and key != host.key:
                    conns.pop(0).close()
                    break

    def cancel(self, stream: Any) -> None:
        """Forget a pending stream (downstream went away, timeout)."""
        for i, (s, _) in enumerate(self.pending):
            if s is stream:
                del self.pending[i]
                self.state.breaker.leave_pending()
                return

    def _open(self, host: Any) -> None:
        self.state.breaker.connection_opened()
        self.connecting += 1
        self.per_host[host.key] = self.per_host.get(host.key, 0) + 1
        self.stats.inc_cluster(self.name, "upstream_cx_total")
        task = self.loop.create_task(self._connect(host))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, host: Any) -> None:
        conn, error = await dial(self, host, lambda: UpstreamConnection(self, host.key))
        if conn is not None:
            self.connecting -= 1
            self.active.add(conn)
            self.release(conn, True)
            return
        self.connecting -= 1
        self._host_gone(host.key)
        self.state.breaker.connection_closed()
        # fail the first pending request for this host; others wait for their own attempts
        for i, (s, h) in enumerate(self.pending):
            if h.key == host.key:
                del self.pending[i]
                self.state.breaker.leave_pending()
                s.connect_failed(error)
                break
        self._serve_pending()

    def _hand(self, conn: UpstreamConnection, stream: Any) -> None:
        conn.requests += 1
        conn.stream = stream  # conn.hand_to(stream) inlined: the codec's events now go
        conn.codec.sink = stream  # straight to the requester
        stream.attach(conn)

    def _serve_pending(self) -> None:
        breaker = self.state.breaker
        while (
            self.pending and self.connecting < len(self.pending) and breaker.can_open_connection()
        ):
            # open for the oldest pending request not yet covered by a connecting socket
            idx = self.connecting
            _, host = self.pending[idx] if idx < len(self.pending) else self.pending[-1]
            self._open(host)
        if self.pending and self.connecting < len(self.pending):
            self.stats.inc_cluster(self.name, "upstream_cx_overflow")
            # at the limit because of other hosts: a pending host with no connection gets one
            for _, host in list(self.pending):
                if not self.per_host.get(host.key):
                    self._open(host)

    def _host_gone(self, key: tuple[str, int]) -> None:
        n = self.per_host.get(key, 0) - 1
        if n > 0:
            self.per_host[key] = n
        else:
            self.per_host.pop(key, None)

    # -- releasing
    def release(self, conn: UpstreamConnection, fresh: bool = False) -> None:
        """The stream is done with ``conn`` (response complete, request fully sent), or
        ``fresh``: ``conn`` just connected. Give it to a pending request for its host or park
        it (one method: the dispatch is not a second call per request)."""
        if not fresh:
            conn.stream = None  # conn.hand_to(None) inlined: stray bytes while idle end up in
            conn.codec.sink = conn  # the connection, which closes
            if conn.closed:
                return
            # (typed: a native read when compiled)
            maxreq = cast("ClusterState", self.state).max_requests_per_connection
            if (
                not conn.codec.keep_alive
                or (maxreq and conn.requests >= maxreq)
                or self.retired
                or conn.stale
            ):
                conn.close()
                return
            if conn.read_paused:
                conn.resume_reading()
        pending = self.pending
        if pending:
            for i, (s, h) in enumerate(pending):
                if h.key == conn.key:
                    del pending[i]
                    self.state.breaker.leave_pending()
                    self._hand(conn, s)
                    return
            # nobody wants this host: close it so a pending request elsewhere can connect
            conn.close()
            return
        idle = self.idle.get(conn.key)
        if idle is None:
            idle = self.idle[conn.key] = []
        if len(idle) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)

    def connection_closed(self, conn: UpstreamConnection) -> None:
        """Called once per connection when it closes (either side)."""
        if conn in self.active:
            self.active.discard(conn)
            self._host_gone(conn.key)
            self.state.breaker.connection_closed()
            self.stats.inc_cluster(self.name, "upstream_cx_destroy")
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if self.pending:
            # at once, as Envoy's pool does on a connection's close event ("if we have pending
            # streams and we just lost a connection we should make a new one"): a connection
            # closed after its last allowed request makes room for the pending request's new one
            # before that request's response is even written downstream
            self._serve_pending()

    def sweep(self, now: float) -> None:
        """Close idle connections older than the cluster's idle timeout."""
        timeout = self.state.cluster.pool.idle_timeout
        for conns in self.idle.values():
            while conns and now - conns[0].idle_since > timeout:
                conns.pop(0).close()

    def prune(self, keys: set[tuple[str, int]]) -> None:
        """Close idle connections to hosts that are no longer endpoints of the cluster."""
        for key in [k for k in self.idle if k not in keys]:
            for c in self.idle.pop(key):
                c.close()

    def retune_tls(self, secure_for: Any) -> None:
        """Keep plaintext and TLS connections apart after a config change: ``secure_for(key)``
        says whether a host wants TLS now (None = unknown host); idle connections that differ
        close, busy ones close when released."""
        for key, conns in list(self.idle.items()):
            want = secure_for(key)
            for c in list(conns):
                if want is not None and c.secure != want:
                    c.close()
        for c in self.active:
            want = secure_for(c.key)
            if want is not None and c.secure != want:
                c.stale = True

    def drain(self, reason: str) -> int:
        """The cluster's TLS or pool settings changed: close idle connections now, busy ones
        once their request is done; returns how many connections were retired."""
        self.generation += 1
        n = 0
        for conns in list(self.idle.values()):
            for c in list(conns):
                c.close()
                n += 1
        self.idle.clear()
        for c in list(self.active):
            if not c.closed and not c.stale:
                c.stale = True
                n += 1
        if n:
            self.stats.inc_cluster(self.name, "upstream_cx_pool_drained", n)
        return n

    def retire(self) -> None:
        """The cluster is gone from the snapshot: close idle connections now, busy ones later."""
        self.retired = True
        self.close_all()

    def close_all(self) -> None:
        for conns in list(self.idle.values()):
            for c in list(conns):
                c.close()
        self.idle.clear()


ClusterPool = Http1Pool  # the name before the pool interface existed

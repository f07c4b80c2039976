"""Circuit breaker: Envoy's per-cluster resource limits, set by Istio's ConnectionPoolSettings.

Theory of operation
-------------------
The breaker only counts; the proxy owns connections and the pending queue. Four resources,
each with an Istio field and the Envoy counter that overflows:

======================  ==========================================  ==============================
resource                Istio field (DestinationRule trafficPolicy)  overflow counter
======================  ==========================================  ==============================
connections             connectionPool.tcp.maxConnections           upstream_cx_overflow
pending requests        connectionPool.http.http1MaxPendingRequests  upstream_rq_pending_overflow
requests (in flight)    connectionPool.http.http2MaxRequests         upstream_rq_pending_overflow
retries (in flight)     connectionPool.http.maxRetries               upstream_rq_retry_overflow
======================  ==========================================  ==============================

As in Envoy: a request that needs a connection while ``connections >= maxConnections`` is not
failed; it waits in the pending queue (``upstream_cx_overflow`` counts the refused connection).
Only when the queue is full too (``pending >= http1MaxPendingRequests``) does it fail at once
with 503 and response flag ``UO``. ``maxRequests`` overflow is also counted in
``upstream_rq_pending_overflow`` (Envoy does the same). Every ``try_*`` that returns True must be
paired with its release (``leave_pending``, ``end_request``, ``end_retry``,
``connection_closed``).

The object is shared across snapshots (``ClusterState`` passes it on and calls ``update``), so
releases of requests started under an older snapshot land in the same counters.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from diktyo.snapshot.model import ConnectionPool

COUNTER_NAMES = (
    "upstream_cx_overflow",
    "upstream_rq_pending_overflow",
    "upstream_rq_retry_overflow",
)

# what -> (current-attribute, limit-attribute, noun phrase, Istio field)
_RESOURCES: dict[str, tuple[str, str, str, str]] = {
    "connections": (
        "connections",
        "max_connections",
        "connections in use",
        "connectionPool.tcp.maxConnections",
    ),
    "pending": (
        "pending",
        "max_pending",
        "requests already waiting for a connection",
        "connectionPool.http.http1MaxPendingRequests",
    ),
    "requests": (
        "requests",
        "max_requests",
        "requests in flight",
        "connectionPool.http.http2MaxRequests",
    ),
    "retries": (
        "retries",
        "max_retries",
        "retries in flight",
        "connectionPool.http.maxRetries",
    ),
}
_ALIASES = {
    "cx": "connections",
    "connection": "connections",
    "max_connections": "connections",
    "upstream_cx_overflow": "connections",
    "pending_requests": "pending",
    "max_pending_requests": "pending",
    "upstream_rq_pending_overflow": "pending",
    "request": "requests",
    "max_requests": "requests",
    "retry": "retries",
    "max_retries": "retries",
    "upstream_rq_retry_overflow": "retries",
}


def _source_phrase(source: str) -> str:
    if not source:
        return "no DestinationRule sets this limit; Istio's default"
    if source.split(" ", 1)[0] in ("DestinationRule", "Sidecar", "MeshConfig", "EnvoyFilter"):
        return source
    return f"DestinationRule {source}"


# resource indices of the shared counts (``shared_breaker.SharedCounts``)
# Final: compiled, inlined constants (no module-dict lookup per use)
CX: Final = 0
PENDING: Final = 1
RQ: Final = 2
RETRY: Final = 3
RESOURCES = ("connections", "pending", "requests", "retries")


class SharedSlots(Protocol):
    """Where a worker's breaker keeps the sidecar-wide counts when the sidecar runs workers
    (``shared_breaker.SharedSlots``, shared memory)."""

    worker: int  # this worker's index
    reserved: int  # connections admitted by can_open_connection, not yet opened

    def admit(self, res: int, limit: int) -> bool: ...
    def add(self, res: int, delta: int) -> None: ...
    def total(self, res: int) -> int: ...


class CircuitBreaker:
    """Counts connections, pending requests, requests and retries of one cluster.

    ``shared``: None in a sidecar without workers (the counts here are the whole story);
    with workers (``concurrency: N``) the sidecar-wide counts live in shared memory, and the
    admissions check and take them through ``shared`` (``shared_breaker.SharedSlots``): a
    delegate, not a subclass, so that this class is compiled with the hot path and the
    per-request ``try_start_request`` / ``end_request`` are native calls (issue 11, `lean`).
    The attributes ``connections`` .. ``retries`` stay this worker's own counts either way.
    """

    __slots__ = (
        "connections",
        "counters",
        "max_connections",
        "max_pending",
        "max_requests",
        "max_retries",
        "pending",
        "pool",
        "requests",
        "retries",
        "shared",
        "source",
    )

    def __init__(
        self, pool: ConnectionPool, source: str, shared: SharedSlots | None = None
    ) -> None:
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.shared = shared
        self.pool = pool
        self.source = source
        self.max_connections = 0
        self.max_pending = 0
        self.max_requests = 0
        self.max_retries = 0
        self.update(pool, source)

    def update(self, pool: ConnectionPool, source: str) -> None:
        """New limits from a new snapshot; current counts are kept."""
        self.pool = pool
        self.source = source
        self.max_connections = pool.max_connections
        self.max_pending = pool.http1_max_pending_requests
        self.max_requests = pool.http2_max_requests
        self.max_retries = pool.max_retries

    def total(self, res: int) -> int:
        """The sidecar's count of resource ``res`` (``CX`` .. ``RETRY``): across workers."""
        sh = self.shared
        if sh is not None:
            return sh.total(res)
        return (self.connections, self.pending, self.requests, self.retries)[res]

    # -- connections
    def can_open_connection(self) -> bool:
        sh = self.shared
        if sh is None:
            if self.connections < self.max_connections:
                return True
        elif sh.admit(CX, self.max_connections):
            # with workers, admitting *reserves* the connection (taken in the shared count at
            # once); connection_opened, called right after, consumes the reservation
            self.connections += 1
            sh.reserved += 1
            return True
        self.counters["upstream_cx_overflow"] += 1
        return False

    def connection_capacity(self) -> bool:
        """Like ``can_open_connection`` but without counting an overflow (for polling)."""
        return self.total(CX) < self.max_connections

    def connection_opened(self) -> None:
        sh = self.shared
        if sh is not None:
            if sh.reserved:
                sh.reserved -= 1  # counted when can_open_connection admitted it
                return
            sh.add(CX, 1)
        self.connections += 1

    def connection_closed(self) -> None:
        if self.connections > 0:
            self.connections -= 1
            sh = self.shared
            if sh is not None:
                sh.add(CX, -1)

    # -- pending queue
    def try_enter_pending(self) -> bool:
        sh = self.shared
        if (self.pending < self.max_pending) if sh is None else sh.admit(PENDING, self.max_pending):
            self.pending += 1
            return True
        self.counters["upstream_rq_pending_overflow"] += 1
        return False

    def leave_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1
            sh = self.shared
            if sh is not None:
                sh.add(PENDING, -1)

    # -- requests in flight
    def try_start_request(self) -> bool:
        sh = self.shared
        if (self.requests < self.max_requests) if sh is None else sh.admit(RQ, self.max_requests):
            self.requests += 1
            return True
        self.counters["upstream_rq_pending_overflow"] += 1
        return False

    def end_request(self) -> None:
        if self.requests > 0:
            self.requests -= 1
            sh = self.shared
            if sh is not None:
                sh.add(RQ, -1)

    # -- retries in flight
    def try_start_retry(self) -> bool:
        sh = self.shared
        if (self.retries < self.max_retries) if sh is None else sh.admit(RETRY, self.max_retries):
            self.retries += 1
            return True
        self.counters["upstream_rq_retry_overflow"] += 1
        return False

    def end_retry(self) -> None:
        if self.retries > 0:
            self.retries -= 1
            sh = self.shared
            if sh is not None:
                sh.add(RETRY, -1)

    # -- reporting
    def overflow_message(self, what: str) -> str:
        """Why a request was refused, naming the DestinationRule and the field to raise.

        ``what``: ``connections``, ``pending``, ``requests`` or ``retries`` (Envoy counter names
        are accepted too).
        """
        key = _ALIASES.get(what, what)
        res = _RESOURCES.get(key)
        if res is None:
            return f"circuit breaker open: {what} ({_source_phrase(self.source)})"
        cur_attr, max_attr, noun, field = res
        cur = self.total(RESOURCES.index(cur_attr))  # with workers: the sidecar's total
        limit = getattr(self, max_attr)
        return (
            f"circuit breaker open: {cur} of {limit} {noun} "
            f"({_source_phrase(self.source)}, {field}={limit})"
        )

    def is_open(self, what: str) -> bool:
        """Envoy's ``*_open`` gauges: True while the resource is at its limit."""
        cur_attr, max_attr, _, _ = _RESOURCES[_ALIASES.get(what, what)]
        return bool(self.total(RESOURCES.index(cur_attr)) >= getattr(self, max_attr))

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "limits": {
                "max_connections": self.max_connections,
                "max_pending_requests": self.max_pending,
                "max_requests": self.max_requests,
                "max_retries": self.max_retries,
            },
            "current": {name: self.total(i) for i, name in enumerate(RESOURCES)},
            "open": {
                "cx_open": self.is_open("connections"),
                "rq_pending_open": self.is_open("pending"),
                "rq_open": self.is_open("requests"),
                "rq_retry_open": self.is_open("retries"),
            },
            "counters": dict(self.counters),
        }
        sh = self.shared
        if sh is not None:  # with workers: "current" is the sidecar's, this is the worker's
            d["this_worker"] = {
                "worker": sh.worker,
                "connections": self.connections,
                "pending": self.pending,
                "requests": self.requests,
                "retries": self.retries,
            }
        return d

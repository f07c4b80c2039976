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

from typing import Any

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


class CircuitBreaker:
    """Counts connections, pending requests, requests and retries of one cluster."""

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
        "source",
    )

    def __init__(self, pool: ConnectionPool, source: str) -> None:
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.update(pool, source)

    def update(self, pool: ConnectionPool, source: str) -> None:
        """New limits from a new snapshot; current counts are kept."""
        self.pool = pool
        self.source = source
        self.max_connections = pool.max_connections
        self.max_pending = pool.http1_max_pending_requests
        self.max_requests = pool.http2_max_requests
        self.max_retries = pool.max_retries

    # -- connections
    def can_open_connection(self) -> bool:
        if self.connections < self.max_connections:
            return True
        self.counters["upstream_cx_overflow"] += 1
        return False

    def connection_capacity(self) -> bool:
        """Like ``can_open_connection`` but without counting an overflow (for polling)."""
        return self.connections < self.max_connections

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        if self.connections > 0:
            self.connections -= 1

    # -- pending queue
    def try_enter_pending(self) -> bool:
        if self.pending < self.max_pending:
            self.pending += 1
            return True
        self.counters["upstream_rq_pending_overflow"] += 1
        return False

    def leave_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1

    # -- requests in flight
    def try_start_request(self) -> bool:
        if self.requests < self.max_requests:
            self.requests += 1
            return True
        self.counters["upstream_rq_pending_overflow"] += 1
        return False

    def end_request(self) -> None:
        if self.requests > 0:
            self.requests -= 1

    # -- retries in flight
    def try_start_retry(self) -> bool:
        if self.retries < self.max_retries:
            self.retries += 1
            return True
        self.counters["upstream_rq_retry_overflow"] += 1
        return False

    def end_retry(self) -> None:
        if self.retries > 0:
            self.retries -= 1

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
        cur = getattr(self, cur_attr)
        limit = getattr(self, max_attr)
        return (
            f"circuit breaker open: {cur} of {limit} {noun} "
            f"({_source_phrase(self.source)}, {field}={limit})"
        )

    def is_open(self, what: str) -> bool:
        """Envoy's ``*_open`` gauges: True while the resource is at its limit."""
        cur_attr, max_attr, _, _ = _RESOURCES[_ALIASES.get(what, what)]
        return bool(getattr(self, cur_attr) >= getattr(self, max_attr))

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "limits": {
                "max_connections": self.max_connections,
                "max_pending_requests": self.max_pending,
                "max_requests": self.max_requests,
                "max_retries": self.max_retries,
            },
            "current": {
                "connections": self.connections,
                "pending": self.pending,
                "requests": self.requests,
                "retries": self.retries,
            },
            "open": {
                "cx_open": self.is_open("connections"),
                "rq_pending_open": self.is_open("pending"),
                "rq_open": self.is_open("requests"),
                "rq_retry_open": self.is_open("retries"),
            },
            "counters": dict(self.counters),
        }

"""The upstream policies the connection manager calls (host state, LB, breaker, retries, faults).

They are owned by ``diktyo.proxy.upstream``, ``diktyo.proxy.router.retry`` and
``diktyo.proxy.filters.fault`` (see UPSTREAM_API.md). Until those modules exist this file
provides minimal stand-ins with the same signatures, so the data plane can be built and tested;
whenever the real module imports, it wins.
"""

from __future__ import annotations

import random
from typing import Any

from diktyo.snapshot.model import Cluster, ConnectionPool, Endpoint, Fault, RetryPolicy

try:  # pragma: no cover - depends on the other engineer's progress
    from diktyo.proxy.upstream.cluster import ClusterState  # type: ignore[import-not-found]
    from diktyo.proxy.upstream.lb import LbContext  # type: ignore[import-not-found]

    REAL_UPSTREAM = True
except ImportError:
    REAL_UPSTREAM = False

try:  # pragma: no cover
    from diktyo.proxy.router.retry import RetryBudget, RetryState  # type: ignore[import-not-found]

    REAL_RETRY = True
except ImportError:
    REAL_RETRY = False

try:  # pragma: no cover
    from diktyo.proxy.filters.fault import decide_fault  # type: ignore[import-not-found]

    REAL_FAULT = True
except ImportError:
    REAL_FAULT = False


if not REAL_UPSTREAM:

    class LbContext:  # type: ignore[no-redef]
        __slots__ = ("cookie_to_set", "headers", "query", "source_ip")

        def __init__(
            self,
            headers: dict[str, str] | None = None,
            source_ip: str = "",
            query: dict[str, str] | None = None,
        ) -> None:
            self.headers = headers or {}
            self.source_ip = source_ip
            self.query = query or {}
            self.cookie_to_set: tuple[str, str, float] | None = None

    class _Host:
        __slots__ = (
            "active_requests",
            "address",
            "consecutive_5xx",
            "consecutive_gateway",
            "ejected_until",
            "ejection_count",
            "endpoint",
            "healthy",
            "key",
            "port",
            "stats",
        )

        def __init__(self, endpoint: Endpoint) -> None:
            self.endpoint = endpoint
            self.address = endpoint.address
            self.port = endpoint.port
            self.key = (endpoint.address, endpoint.port)
            self.active_requests = 0
            self.ejected_until = 0.0
            self.ejection_count = 0
            self.consecutive_5xx = 0
            self.consecutive_gateway = 0
            self.healthy = True
            self.stats: dict[str, int] = {}

        def available(self, now: float) -> bool:
            return self.healthy and self.ejected_until <= now

    class _Breaker:
        def __init__(self, pool: ConnectionPool, source: str) -> None:
            self.pool = pool
            self.source = source
            self.connections = 0
            self.pending = 0
            self.requests = 0
            self.retries = 0
            self.counters: dict[str, int] = {
                "upstream_rq_pending_overflow": 0,
                "upstream_cx_overflow": 0,
                "upstream_rq_retry_overflow": 0,
            }

        def can_open_connection(self) -> bool:
            if self.connections < self.pool.max_connections:
                return True
            self.counters["upstream_cx_overflow"] += 1
            return False

        def connection_opened(self) -> None:
            self.connections += 1

        def connection_closed(self) -> None:
            self.connections = max(0, self.connections - 1)

        def try_enter_pending(self) -> bool:
            if self.pending < self.pool.http1_max_pending_requests:
                self.pending += 1
                return True
            self.counters["upstream_rq_pending_overflow"] += 1
            return False

        def leave_pending(self) -> None:
            self.pending = max(0, self.pending - 1)

        def try_start_request(self) -> bool:
            if self.requests < self.pool.http2_max_requests:
                self.requests += 1
                return True
            return False

        def end_request(self) -> None:
            self.requests = max(0, self.requests - 1)

        def try_start_retry(self) -> bool:
            if self.retries < self.pool.max_retries:
                self.retries += 1
                return True
            self.counters["upstream_rq_retry_overflow"] += 1
            return False

        def end_retry(self) -> None:
            self.retries = max(0, self.retries - 1)

        def overflow_message(self, what: str) -> str:
            src = f" (DestinationRule {self.source})" if self.source else ""
            if what == "pending":
                return (
                    f"circuit breaker open: {self.pending} of "
                    f"{self.pool.http1_max_pending_requests} pending requests queued{src}"
                )
            return f"circuit breaker open: {what} limit reached{src}"

    class ClusterState:  # type: ignore[no-redef]
        def __init__(
            self, cluster: Cluster, clock: Any, rng: random.Random, previous: Any = None
        ) -> None:
            self.cluster = cluster
            self.clock = clock
            self.rng = rng
            old = {h.key: h for h in previous.hosts} if previous is not None else {}
            self.hosts = [old.get((e.address, e.port)) or _Host(e) for e in cluster.endpoints]
            for h, e in zip(self.hosts, cluster.endpoints):
                h.endpoint = e
            self.breaker = _Breaker(cluster.pool, cluster.policy_source)
            if previous is not None:
                for a in ("connections", "pending", "requests", "retries"):
                    setattr(self.breaker, a, getattr(previous.breaker, a))
            self._rr = 0

        def pick_host(self, ctx: Any, exclude: Any = frozenset()) -> Any:
            now = self.clock.monotonic()
            hosts = [h for h in self.hosts if h.available(now)]
            if not hosts:
                return None
            pref = [h for h in hosts if h.key not in exclude] or hosts
            self._rr += 1
            return pref[self._rr % len(pref)]

        def on_request_start(self, host: Any) -> None:
            host.active_requests += 1

        def on_request_end(self, host: Any, status: int | None, gateway_error: bool) -> None:
            host.active_requests -= 1

        def tick(self) -> None:
            pass

        def describe(self) -> dict[str, Any]:
            return {
                "name": self.cluster.name,
                "hosts": [
                    {
                        "address": h.address,
                        "port": h.port,
                        "healthy": h.healthy,
                        "ejected": h.ejected_until > self.clock.monotonic(),
                        "active_requests": h.active_requests,
                    }
                    for h in self.hosts
                ],
                "circuit_breaker": dict(self.breaker.counters),
            }


if not REAL_RETRY:

    class RetryBudget:  # type: ignore[no-redef]
        def __init__(self, percent: float, min_concurrency: int) -> None:
            self.percent = percent
            self.min_concurrency = min_concurrency
            self.active = 0

        def try_acquire(self, active_requests: int) -> bool:
            limit = max(self.min_concurrency, int(active_requests * self.percent / 100))
            if self.active < limit:
                self.active += 1
                return True
            return False

        def release(self) -> None:
            self.active = max(0, self.active - 1)

    _DEFAULT_POLICY = RetryPolicy()

    class RetryState:  # type: ignore[no-redef]
        def __init__(
            self, policy: RetryPolicy | None, rng: random.Random, budget: Any = None
        ) -> None:
            self.policy = policy if policy is not None else _DEFAULT_POLICY
            self.rng = rng
            self.attempts_done = 1
            self.per_try_timeout = self.policy.per_try_timeout
            self._on = set(self.policy.retry_on)
            codes = set(self.policy.retriable_status_codes)
            for v in self.policy.retry_on:
                if v.isdigit():
                    codes.add(int(v))
            self._codes = codes

        def _take(self) -> bool:
            if self.attempts_done >= 1 + self.policy.attempts:
                return False
            self.attempts_done += 1
            return True

        def should_retry_status(self, status: int, headers: dict[str, str] | None = None) -> bool:
            on = self._on
            hit = (
                (status >= 500 and "5xx" in on)
                or (status in (502, 503, 504) and "gateway-error" in on)
                or (status == 409 and "retriable-4xx" in on)
                or status in self._codes
            )
            return hit and self._take()

        def should_retry_reset(self, kind: str) -> bool:
            on = self._on
            if kind == "connect-failure":
                hit = (
                    "connect-failure" in on or "5xx" in on or "gateway-error" in on or "reset" in on
                )
            elif kind == "timeout":
                hit = "5xx" in on or "gateway-error" in on or "reset" in on
            elif kind == "refused-stream":
                hit = "refused-stream" in on or "5xx" in on
            else:
                hit = "reset" in on or "5xx" in on
            return hit and self._take()

        def next_backoff(self) -> float:
            n = self.attempts_done - 1
            return self.rng.random() * min(0.25, 0.025 * (2 ** max(0, n - 1)))


if not REAL_FAULT:

    def decide_fault(fault: Fault | None, rng: random.Random) -> tuple[float | None, int | None]:
        if fault is None:
            return None, None
        delay = None
        abort = None
        if fault.delay is not None and rng.random() * 100 < fault.delay.percentage:
            delay = fault.delay.fixed_delay
        if fault.abort is not None and rng.random() * 100 < fault.abort.percentage:
            abort = fault.abort.http_status
        return delay, abort


__all__ = ["ClusterState", "LbContext", "RetryBudget", "RetryState", "decide_fault"]

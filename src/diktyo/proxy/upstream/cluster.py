"""ClusterState: the runtime state of one snapshot Cluster (hosts, LB, breaker, outliers, budget).

Theory of operation
-------------------
The proxy builds one ``ClusterState`` per cluster of every snapshot it applies, passing the
same-named state of the previous snapshot as ``previous``. Everything that counts things in
flight is carried over *as the same object*: ``Host`` objects with the same ``(address, port)``,
the ``CircuitBreaker``, the ``OutlierDetector`` and the ``RetryBudget`` (each takes the new
limits through ``update``). So a request started under the old snapshot that ends through the
old ``ClusterState`` still decrements the counters the new one reads.

Per request: ``pick_host`` -> ``on_request_start`` -> ... -> ``on_request_end``. The list of
available hosts is cached and rebuilt only when availability can have changed (an ejection, an
un-ejection, the earliest ejection end time passing), so a pick allocates nothing unless the
request excludes hosts it already tried.

Panic (Istio ``minHealthPercent``, Envoy's ``healthy_panic_threshold``): when fewer than
``minHealthPercent`` percent of the hosts are available, the load balancer picks among all
hosts, ejected or not. 0 (Istio's default) disables it: then no available host -> ``None``
(the proxy answers 503 ``UH``, "no healthy upstream").
"""

from __future__ import annotations

import random
import time as _time
from typing import Any, Final

from diktyo.core.clock import Clock, SystemClock
from diktyo.proxy.router.retry import RetryBudget
from diktyo.proxy.upstream.circuit_breaker import CircuitBreaker
from diktyo.proxy.upstream.host import Host
from diktyo.proxy.upstream.lb import (
    LbContext,
    LeastRequestLB,
    LoadBalancerImpl,
    RoundRobinLB,
    make_load_balancer,
)
from diktyo.proxy.upstream.outlier import OutlierDetector
from diktyo.proxy.upstream.shared_breaker import new_breaker
from diktyo.snapshot.model import Cluster

_INF: Final = float("inf")  # Final: compiled, a static (no module-dict lookup per use)
_NO_EXCLUDE: frozenset[tuple[str, int]] = frozenset()

COUNTER_NAMES = (
    "upstream_cx_none_healthy",  # no available host: 503 UH
    "lb_healthy_panic",  # picks made in panic mode (minHealthPercent)
    "upstream_rq_total",
    "upstream_rq_5xx",
    "upstream_rq_reset",
)


class ClusterState:
    """Runtime state of one snapshot Cluster: hosts, load balancer, circuit breaker, outliers."""

    __slots__ = (
        "_avail",
        "_avail_until",
        "_gen",
        "_host_ids",
        "_monotonic",
        "breaker",
        "clock",
        "cluster",
        "counters",
        "hashed",
        "hosts",
        "lb",
        "max_requests_per_connection",
        "min_health_percent",
        "name",
        "outlier",
        "panic",
        "retry_budget",
        "rng",
    )

    def __init__(
        self,
        cluster: Cluster,
        clock: Clock,
        rng: random.Random,
        previous: ClusterState | None = None,
        *,
        retry_budget_percent: float = 20.0,
        retry_budget_min: int = 3,
    ) -> None:
        self.cluster = cluster
        self.name = cluster.name
        # read per released connection: a native field (compiled), not the model's
        self.max_requests_per_connection = cluster.pool.max_requests_per_connection
        self.hosts: list[Host]
        self.breaker: CircuitBreaker
        self.retry_budget: RetryBudget
        self.clock = clock
        # the system clock's C function directly: no Python frame per pick_host
        self._monotonic = _time.monotonic if type(clock) is SystemClock else clock.monotonic
        self.rng = rng
        old: dict[tuple[str, int], Host] = {}
        if previous is not None:
            old = {h.key: h for h in previous.hosts}
            self.counters: dict[str, int] = previous.counters  # shared, like the breaker
        else:
            self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        hosts: list[Host] = []
        seen: set[tuple[str, int]] = set()
        for ep in cluster.endpoints:
            key = (ep.address, ep.port)
            if key in seen:
                continue  # duplicate endpoint: the first one wins
            seen.add(key)
            h = old.get(key)
            if h is None:
                h = Host(ep)
            else:
                h.update(ep)
            hosts.append(h)
        self.hosts = hosts
        self._host_ids = frozenset(id(h) for h in hosts)

        if previous is not None:
            self.breaker = previous.breaker
            self.breaker.update(cluster.pool, cluster.policy_source)
            self.retry_budget = previous.retry_budget
            self.retry_budget.update(retry_budget_percent, retry_budget_min)
        else:
            # shared across the sidecar's worker processes when it runs several
            self.breaker = new_breaker(cluster.name, cluster.pool, cluster.policy_source)
            self.retry_budget = RetryBudget(retry_budget_percent, retry_budget_min)

        od = cluster.outlier
        if od is None:
            self.outlier: OutlierDetector | None = None
            self.min_health_percent = 0.0
            for h in hosts:  # detection removed: nobody stays ejected
                h.ejected_until = 0.0
                h.consecutive_5xx = 0
                h.consecutive_gateway = 0
        else:
            if previous is not None and previous.outlier is not None:
                self.outlier = previous.outlier
                self.outlier.update(od)
            else:
                self.outlier = OutlierDetector(od, clock)
            self.min_health_percent = od.min_health_percent

        self.lb: LoadBalancerImpl = make_load_balancer(cluster.lb, rng)
        self.hashed = cluster.lb.consistent_hash is not None  # read per request (native)
        self.lb.set_hosts(hosts)
        self.panic = False
        self._avail: list[Host] = []
        self._avail_until = -_INF  # forces a refresh on first pick
        self._gen = -1

    # ------------------------------------------------------------------ availability
    def invalidate(self) -> None:
        """Host health changed outside outlier detection: rebuild the available list."""
        self._avail_until = -_INF

    def _refresh(self, now: float) -> None:
        avail: list[Host] = []
        until = _INF
        for h in self.hosts:
            eu = h.ejected_until
            if eu > now:
                until = min(until, eu)
            elif h.healthy:
                avail.append(h)
        od = self.outlier
        self._gen = od.generation if od is not None else -1
        hosts = self.hosts
        mhp = self.min_health_percent
        panic = bool(hosts) and mhp > 0 and 100.0 * len(avail) / len(hosts) < mhp
        if panic:
            avail = list(hosts)
        self.panic = panic
        self._avail = avail
        self._avail_until = until

    def available_hosts(self) -> list[Host]:
        """Hosts the load balancer may use now (all hosts while in panic)."""
        now = self.clock.monotonic()
        od = self.outlier
        if now >= self._avail_until or (od is not None and od.generation != self._gen):
            self._refresh(now)
        return self._avail

    # ------------------------------------------------------------------ per request
    def pick_host(self, ctx: LbContext, exclude: Any = _NO_EXCLUDE) -> Host | None:
        """A host for this request, or None (no endpoints / none available: 503 ``UH``).

        ``exclude``: keys ``(address, port)`` of hosts this request already tried; another
        host is preferred, but when every available host was tried one of them is reused
        (Envoy's ``previous_hosts`` predicate gives up after a few attempts the same way).
        """
        now = self._monotonic()
        od = self.outlier
        if now >= self._avail_until or (od is not None and od.generation != self._gen):
            self._refresh(now)
        avail = self._avail
        if not avail:
            self.counters["upstream_cx_none_healthy"] += 1
            return None
        if self.panic:
            self.counters["lb_healthy_panic"] += 1
        if exclude:
            rest = [h for h in avail if h.key not in exclude]
            if rest:
                avail = rest
        lb = self.lb
        if isinstance(lb, LeastRequestLB):  # Istio's default: compiled, a native call
            return lb.pick(avail, ctx)
        if isinstance(lb, RoundRobinLB):
            return lb.pick(avail, ctx)
        return lb.pick(avail, ctx)

    @property
    def active_requests(self) -> int:
        """Requests in flight to this cluster (shared with older states of the same cluster)."""
        return self.retry_budget.active_requests

    def on_request_start(self, host: Host) -> None:
        host.active_requests += 1
        self.retry_budget.active_requests += 1

    def on_request_cancel(self, host: Host) -> None:
        """Undo ``on_request_start`` for a request that never reached the host (e.g. a local
        circuit-breaker overflow): no stats, no outlier accounting."""
        if host.active_requests > 0:
            host.active_requests -= 1
        budget = self.retry_budget
        if budget.active_requests > 0:
            budget.active_requests -= 1

    def on_request_end(self, host: Host, status: int | None, gateway_error: bool) -> None:
        """``status`` None: reset / connect failure / timeout (counted as a gateway error)."""
        if host.active_requests > 0:
            host.active_requests -= 1
        budget = self.retry_budget
        if budget.active_requests > 0:
            budget.active_requests -= 1
        st = host.stats
        st.rq_total += 1
        c = self.counters
        c["upstream_rq_total"] += 1
        if status is None:
            st.rq_error += 1
            st.rq_reset += 1
            c["upstream_rq_reset"] += 1
        elif status >= 500 or gateway_error:
            st.rq_error += 1
            c["upstream_rq_5xx"] += 1
        else:
            st.rq_success += 1
            if self.outlier is not None and id(host) in self._host_ids:
                # OutlierDetector.record's success path, inlined (the common case)
                host.consecutive_5xx = 0
                host.consecutive_gateway = 0
            return
        od = self.outlier
        if (
            od is not None
            and id(host) in self._host_ids
            and od.record(host, status, gateway_error, self.hosts)
        ):
            self._avail_until = -_INF

    def tick(self) -> None:
        """Called by the proxy about every second: outlier-detection interval work."""
        od = self.outlier
        if od is not None and od.tick(self.hosts):
            self._avail_until = -_INF

    # ------------------------------------------------------------------ admin
    def describe(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        c = self.cluster
        lb = c.lb
        return {
            "name": c.name,
            "service": c.service,
            "port": c.port,
            "subset": c.subset,
            "lb_policy": "CONSISTENT_HASH" if lb.consistent_hash is not None else lb.simple,
            "active_requests": self.active_requests,
            "panic": self.panic,
            "hosts": [h.describe(now) for h in self.hosts],
            "circuit_breaker": self.breaker.describe(),
            "outlier_detection": (
                self.outlier.describe(self.hosts) if self.outlier is not None else None
            ),
            "retry_budget": self.retry_budget.describe(),
            "counters": dict(self.counters),
        }

"""ClusterState: picks among available hosts, feeds outlier detection, survives snapshot changes."""

from __future__ import annotations

import collections
import json
import random

from diktyo.core.clock import ManualClock
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.proxy.upstream.host import Host
from diktyo.proxy.upstream.lb import LbContext
from diktyo.snapshot.model import (
    Cluster,
    ConnectionPool,
    ConsistentHash,
    Endpoint,
    LoadBalancer,
    OutlierDetection,
)

NAME = "outbound|9080||reviews.default.svc.cluster.local"


def eps(n: int, start: int = 0) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(address=f"10.0.0.{i + 1}", port=9080) for i in range(start, start + n))


def state(
    n: int = 3,
    previous: ClusterState | None = None,
    clock: ManualClock | None = None,
    **kw: object,
) -> ClusterState:
    kw.setdefault("endpoints", eps(n))
    c = Cluster(name=NAME, **kw)  # type: ignore[arg-type]
    return ClusterState(c, clock or ManualClock(), random.Random(7), previous)


def test_host_contract() -> None:
    h = Host(Endpoint(address="10.1.1.1", port=80, weight=0))
    assert h.key == ("10.1.1.1", 80) and h.weight == 1
    assert h.available(0.0)
    h.ejected_until = 5.0
    assert not h.available(4.9) and h.available(5.0)
    h.healthy = False
    assert not h.available(10.0)


def test_no_endpoints_gives_none() -> None:
    cs = state(0)
    assert cs.pick_host(LbContext()) is None
    assert cs.counters["upstream_cx_none_healthy"] == 1


def test_duplicate_endpoints_are_merged() -> None:
    cs = state(endpoints=eps(2) + eps(1))
    assert len(cs.hosts) == 2


def test_request_accounting() -> None:
    cs = state(2, lb=LoadBalancer(simple="ROUND_ROBIN"))
    h = cs.pick_host(LbContext())
    assert h is not None
    cs.on_request_start(h)
    assert h.active_requests == 1 and cs.active_requests == 1
    assert cs.retry_budget.active_requests == 1
    cs.on_request_end(h, 200, False)
    assert h.active_requests == 0 and cs.active_requests == 0
    assert h.stats.rq_total == 1 and h.stats.rq_success == 1
    cs.on_request_start(h)
    cs.on_request_end(h, None, True)
    assert h.stats.rq_reset == 1 and h.stats.rq_error == 1


def test_cancel_undoes_start_without_outlier_accounting() -> None:
    cs = state(2, outlier=OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100.0))
    h = cs.hosts[0]
    for _ in range(3):
        cs.on_request_start(h)
        cs.on_request_cancel(h)  # e.g. 503 UO: the request never reached the host
    assert h.active_requests == 0 and cs.active_requests == 0
    assert h.stats.rq_total == 0 and h.available(cs.clock.monotonic())


def test_exclude_prefers_untried_hosts() -> None:
    cs = state(3, lb=LoadBalancer(simple="RANDOM"))
    first = cs.pick_host(LbContext())
    assert first is not None
    for _ in range(50):
        h = cs.pick_host(LbContext(), exclude={first.key})
        assert h is not None and h is not first
    every = {h.key for h in cs.hosts}
    assert cs.pick_host(LbContext(), exclude=every) is not None  # all tried: reuse one


def test_outlier_ejection_through_requests_and_tick() -> None:
    clock = ManualClock(start=0.0)
    cs = state(
        3,
        clock=clock,
        lb=LoadBalancer(simple="ROUND_ROBIN"),
        outlier=OutlierDetection(max_ejection_percent=100.0),
    )
    bad = cs.hosts[1]
    for _ in range(5):
        cs.on_request_start(bad)
        cs.on_request_end(bad, 503, False)
    picks = collections.Counter(cs.pick_host(LbContext()).key for _ in range(30))  # type: ignore[union-attr]
    assert bad.key not in picks and len(picks) == 2
    clock.now = 29.0
    cs.tick()
    assert all(cs.pick_host(LbContext()) is not bad for _ in range(10))
    clock.now = 30.0
    cs.tick()
    picks = collections.Counter(cs.pick_host(LbContext()).key for _ in range(30))  # type: ignore[union-attr]
    assert picks[bad.key] == 10
    assert cs.describe()["outlier_detection"]["counters"]["unejections_total"] == 1


def test_all_hosts_ejected_gives_none() -> None:
    clock = ManualClock(start=0.0)
    cs = state(1, clock=clock, outlier=OutlierDetection(max_ejection_percent=100.0))
    h = cs.hosts[0]
    for _ in range(5):
        cs.on_request_start(h)
        cs.on_request_end(h, None, True)
    assert cs.pick_host(LbContext()) is None  # 503 UH "no healthy upstream"
    clock.now = 30.0
    assert cs.pick_host(LbContext()) is h  # back without waiting for tick


def test_min_health_percent_panics_to_all_hosts() -> None:
    clock = ManualClock(start=0.0)
    cs = state(
        2,
        clock=clock,
        lb=LoadBalancer(simple="ROUND_ROBIN"),
        outlier=OutlierDetection(max_ejection_percent=100.0, min_health_percent=60.0),
    )
    bad = cs.hosts[0]
    for _ in range(5):
        cs.on_request_start(bad)
        cs.on_request_end(bad, 500, False)
    assert bad.ejected_until > clock.now
    # 1 of 2 available = 50 % < 60 %: panic, the LB uses both hosts
    picks = {cs.pick_host(LbContext()).key for _ in range(10)}  # type: ignore[union-attr]
    assert bad.key in picks
    assert cs.panic and cs.counters["lb_healthy_panic"] == 10


def test_min_health_percent_zero_does_not_panic() -> None:
    clock = ManualClock(start=0.0)
    cs = state(
        2,
        clock=clock,
        lb=LoadBalancer(simple="ROUND_ROBIN"),
        outlier=OutlierDetection(max_ejection_percent=100.0),
    )
    bad = cs.hosts[0]
    for _ in range(5):
        cs.on_request_start(bad)
        cs.on_request_end(bad, 500, False)
    assert all(cs.pick_host(LbContext()) is not bad for _ in range(10))
    assert not cs.panic


def test_unhealthy_host_after_invalidate() -> None:
    cs = state(2, lb=LoadBalancer(simple="ROUND_ROBIN"))
    cs.pick_host(LbContext())
    cs.hosts[0].healthy = False
    cs.invalidate()
    assert all(cs.pick_host(LbContext()) is cs.hosts[1] for _ in range(5))


def test_previous_state_carries_over() -> None:
    clock = ManualClock(start=0.0)
    old = state(
        3,
        clock=clock,
        pool=ConnectionPool(max_connections=1),
        outlier=OutlierDetection(max_ejection_percent=100.0),
        policy_source="DestinationRule a",
    )
    kept, ejected, gone = old.hosts
    old.on_request_start(kept)
    for _ in range(5):
        old.on_request_start(ejected)
        old.on_request_end(ejected, 503, False)
    old.on_request_start(gone)
    old.breaker.connection_opened()
    assert old.retry_budget.try_acquire()
    new_eps = (kept.endpoint, ejected.endpoint, Endpoint(address="10.0.0.9", port=9080, weight=2))
    new = state(
        endpoints=new_eps,
        previous=old,
        clock=clock,
        pool=ConnectionPool(max_connections=10),
        outlier=OutlierDetection(max_ejection_percent=100.0),
        policy_source="DestinationRule b",
    )
    assert new.hosts[0] is kept and new.hosts[1] is ejected
    assert kept.active_requests == 1
    assert not ejected.available(clock.now) and ejected.ejection_count == 1
    assert new.hosts[2].key == ("10.0.0.9", 9080) and new.hosts[2].weight == 2
    # the same breaker object with new limits: releases via the old state land in it
    assert new.breaker is old.breaker and new.breaker.connections == 1
    assert new.breaker.max_connections == 10 and new.breaker.source == "DestinationRule b"
    assert new.retry_budget is old.retry_budget and new.retry_budget.in_flight == 1
    assert new.outlier is old.outlier
    assert new.active_requests == 2
    # a request to a host that left finishes through the old state without harm
    old.on_request_end(gone, 503, False)
    assert gone.active_requests == 0 and new.active_requests == 1
    assert all(new.pick_host(LbContext()) is not ejected for _ in range(20))


def test_outlier_removed_clears_ejection() -> None:
    clock = ManualClock(start=0.0)
    old = state(2, clock=clock, outlier=OutlierDetection(max_ejection_percent=100.0))
    h = old.hosts[0]
    for _ in range(5):
        old.on_request_start(h)
        old.on_request_end(h, 503, False)
    new = state(2, previous=old, clock=clock)
    assert new.outlier is None and h.available(clock.now)


def test_consistent_hash_through_cluster_state_survives_ejection() -> None:
    clock = ManualClock(start=0.0)
    cs = state(
        5,
        clock=clock,
        lb=LoadBalancer(consistent_hash=ConsistentHash(http_header_name="x-user")),
        outlier=OutlierDetection(max_ejection_percent=100.0),
    )
    ctxs = [LbContext(headers={"x-user": f"u{i}"}) for i in range(300)]
    before = [cs.pick_host(c) for c in ctxs]
    bad = cs.hosts[3]
    for _ in range(5):
        cs.on_request_start(bad)
        cs.on_request_end(bad, 503, False)
    after = [cs.pick_host(c) for c in ctxs]
    for b, a in zip(before, after, strict=False):
        assert a is not bad
        if b is not bad:
            assert a is b


def test_describe_is_json() -> None:
    cs = state(2, outlier=OutlierDetection(), policy_source="DestinationRule reviews")
    cs.pick_host(LbContext())
    d = json.loads(json.dumps(cs.describe()))
    assert d["name"] == NAME and len(d["hosts"]) == 2
    assert d["lb_policy"] == "LEAST_REQUEST"
    assert d["circuit_breaker"]["source"] == "DestinationRule reviews"
    assert {"address", "port", "ejected", "active_requests", "rq_total"} <= set(d["hosts"][0])

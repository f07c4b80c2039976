"""Stateful property test: ClusterState invariants under random traffic, time and snapshots."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from diktyo.core.clock import ManualClock
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.proxy.upstream.host import Host
from diktyo.proxy.upstream.lb import LbContext
from diktyo.snapshot.model import (
    Cluster,
    ConsistentHash,
    Endpoint,
    LoadBalancer,
    OutlierDetection,
)

LBS = [
    LoadBalancer(simple="ROUND_ROBIN"),
    LoadBalancer(simple="LEAST_REQUEST"),
    LoadBalancer(simple="RANDOM"),
    LoadBalancer(consistent_hash=ConsistentHash(http_header_name="x-k")),
]


def cluster(n_from: int, n_to: int, lb: LoadBalancer, max_pct: float) -> Cluster:
    eps = tuple(Endpoint(address=f"10.0.0.{i}", port=80) for i in range(n_from, n_to))
    od = OutlierDetection(consecutive_5xx_errors=2, max_ejection_percent=max_pct)
    return Cluster(name="c", endpoints=eps, lb=lb, outlier=od)


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(start=0.0)
        self.cs = ClusterState(cluster(0, 5, LBS[0], 40.0), self.clock, random.Random(0))
        self.in_flight: list[tuple[ClusterState, Host]] = []
        self.max_pct = 40.0
        self.snapshots_changed = False

    @rule(key=st.integers(0, 20), tried=st.booleans())
    def pick_and_start(self, key: int, tried: bool) -> None:
        exclude = {self.cs.hosts[0].key} if tried and self.cs.hosts else frozenset()
        h = self.cs.pick_host(LbContext(headers={"x-k": str(key)}), exclude)
        if not self.cs.hosts:
            assert h is None
            return
        if h is None:
            now = self.clock.monotonic()
            assert not any(x.available(now) for x in self.cs.hosts)
            return
        assert h in self.cs.hosts
        assert h.available(self.clock.monotonic()) or self.cs.panic
        self.cs.on_request_start(h)
        self.in_flight.append((self.cs, h))

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 100), status=st.sampled_from([200, 404, 500, 503, None]))
    def end(self, i: int, status: int | None) -> None:
        cs, h = self.in_flight.pop(i % len(self.in_flight))
        cs.on_request_end(h, status, status is None)

    @rule(seconds=st.floats(0.0, 40.0))
    def advance_and_tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.cs.tick()

    @rule(
        lo=st.integers(0, 3),
        hi=st.integers(3, 8),
        lb=st.sampled_from(LBS),
        pct=st.sampled_from([10.0, 40.0, 100.0]),
    )
    def new_snapshot(self, lo: int, hi: int, lb: LoadBalancer, pct: float) -> None:
        self.cs = ClusterState(cluster(lo, hi, lb, pct), self.clock, random.Random(1), self.cs)
        self.max_pct = pct
        self.snapshots_changed = True

    @invariant()
    def active_counts_match(self) -> None:
        assert self.cs.active_requests == len(self.in_flight)
        for h in self.cs.hosts:
            assert h.active_requests == sum(1 for _, x in self.in_flight if x is h)

    @invariant()
    def ejections_within_cap(self) -> None:
        if self.snapshots_changed:
            return  # the cap holds per snapshot; hosts ejected earlier may exceed a new one
        now = self.clock.monotonic()
        ejected = sum(1 for h in self.cs.hosts if h.ejected_until > now)
        assert ejected * 100.0 <= self.max_pct * len(self.cs.hosts) + 1e-6


ClusterMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestClusterMachine = ClusterMachine.TestCase

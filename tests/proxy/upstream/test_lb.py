"""Load balancers: one suite every implementation passes, then each policy's own behaviour."""

from __future__ import annotations

import collections
import random

import pytest

from diktyo.proxy.upstream.host import Host
from diktyo.proxy.upstream.lb import (
    LbContext,
    LeastRequestLB,
    PassthroughLB,
    RandomLB,
    RingHashLB,
    RoundRobinLB,
    cookie_value,
    make_load_balancer,
)
from diktyo.snapshot.model import ConsistentHash, Endpoint, LoadBalancer


def make_hosts(n: int, weights: list[int] | None = None) -> list[Host]:
    return [
        Host(
            Endpoint(address=f"10.0.0.{i + 1}", port=9000 + i, weight=weights[i] if weights else 1)
        )
        for i in range(n)
    ]


POLICIES = {
    "round_robin": LoadBalancer(simple="ROUND_ROBIN"),
    "least_request": LoadBalancer(simple="LEAST_REQUEST"),
    "random": LoadBalancer(simple="RANDOM"),
    "passthrough": LoadBalancer(simple="PASSTHROUGH"),
    "hash_header": LoadBalancer(consistent_hash=ConsistentHash(http_header_name="x-user")),
    "hash_cookie": LoadBalancer(
        consistent_hash=ConsistentHash(http_cookie="session", http_cookie_ttl=60.0)
    ),
    "hash_source_ip": LoadBalancer(consistent_hash=ConsistentHash(use_source_ip=True)),
    "hash_query": LoadBalancer(consistent_hash=ConsistentHash(http_query_parameter_name="u")),
}


def ctx_for(i: int) -> LbContext:
    return LbContext(
        headers={"x-user": f"user{i}", "cookie": f"a=b; session=s{i}"},
        source_ip=f"192.168.1.{i % 250}",
        query={"u": str(i)},
    )


# ---------------------------------------------------------------- one suite, every LB


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_picks_only_given_hosts(name: str) -> None:
    all_hosts = make_hosts(6)
    lb = make_load_balancer(POLICIES[name], random.Random(1))
    lb.set_hosts(all_hosts)
    subset = [all_hosts[1], all_hosts[3], all_hosts[4]]
    allowed = {h.key for h in subset}
    for i in range(300):
        h = lb.pick(subset, ctx_for(i))
        assert h is not None and h.key in allowed


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_without_set_hosts_picks_only_given_hosts(name: str) -> None:
    hs = make_hosts(4)
    lb = make_load_balancer(POLICIES[name], random.Random(2))
    for sub in (hs, hs[:2], hs[2:], hs):
        allowed = {h.key for h in sub}
        for i in range(50):
            h = lb.pick(sub, ctx_for(i))
            assert h is not None and h.key in allowed


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_empty_gives_none(name: str) -> None:
    lb = make_load_balancer(POLICIES[name], random.Random(3))
    assert lb.pick([], LbContext()) is None
    lb.set_hosts(make_hosts(3))
    assert lb.pick([], ctx_for(1)) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_single_host_always_picked(name: str) -> None:
    hs = make_hosts(1)
    lb = make_load_balancer(POLICIES[name], random.Random(4))
    assert all(lb.pick(hs, ctx_for(i)) is hs[0] for i in range(20))


def test_factory_types() -> None:
    rng = random.Random(0)
    assert isinstance(make_load_balancer(LoadBalancer(), rng), LeastRequestLB)  # Istio default
    assert isinstance(make_load_balancer(POLICIES["round_robin"], rng), RoundRobinLB)
    assert isinstance(make_load_balancer(POLICIES["random"], rng), RandomLB)
    assert isinstance(make_load_balancer(POLICIES["passthrough"], rng), PassthroughLB)
    assert isinstance(make_load_balancer(POLICIES["hash_header"], rng), RingHashLB)


# ---------------------------------------------------------------- round robin


def test_round_robin_cycles_in_order() -> None:
    hs = make_hosts(4)
    lb = RoundRobinLB(random.Random(5))
    picks = [lb.pick(hs, LbContext()) for _ in range(12)]
    first = picks[:4]
    assert {h.key for h in first if h} == {h.key for h in hs}  # each host once per round
    assert picks[4:8] == first and picks[8:12] == first
    # consecutive picks follow the list order (modulo the random start)
    start = hs.index(first[0])  # type: ignore[arg-type]
    assert first == [hs[(start + i) % 4] for i in range(4)]


def test_round_robin_weighted_is_proportional_and_interleaved() -> None:
    hs = make_hosts(2, weights=[1, 3])
    lb = RoundRobinLB(random.Random(6))
    picks = [lb.pick(hs, LbContext()) for _ in range(400)]
    c = collections.Counter(h.key for h in picks if h)
    assert c[hs[0].key] == 100 and c[hs[1].key] == 300
    # smooth: the light host never waits more than 4 picks
    for i in range(0, 400, 4):
        assert hs[0] in picks[i : i + 4]


# ---------------------------------------------------------------- least request


def test_least_request_prefers_idle_host() -> None:
    hs = make_hosts(3)
    hs[1].active_requests = 10
    hs[2].active_requests = 10
    lb = LeastRequestLB(random.Random(7))
    n = 6000
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(n))  # type: ignore[union-attr]
    # P2C: idle host wins unless both samples are busy: 1 - (2/3)^2 = 5/9
    expected = n * 5 / 9
    assert abs(c[hs[0].key] - expected) < 5 * (n * 5 / 9 * 4 / 9) ** 0.5
    assert c[hs[0].key] > 2 * n / 3 * 0.75  # well above uniform (n/3)


def test_least_request_equal_load_spreads() -> None:
    hs = make_hosts(4)
    lb = LeastRequestLB(random.Random(8))
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(8000))  # type: ignore[union-attr]
    for h in hs:
        assert 1800 < c[h.key] < 2200


def test_least_request_weighted() -> None:
    hs = make_hosts(2, weights=[1, 4])
    lb = LeastRequestLB(random.Random(9))
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(5000))  # type: ignore[union-attr]
    assert 0.75 < c[hs[1].key] / 5000 < 0.85
    hs[1].active_requests = 7  # 4/8 = 0.5 vs 1/1 -> light host now favoured
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(5000))  # type: ignore[union-attr]
    assert c[hs[0].key] > c[hs[1].key]


# ---------------------------------------------------------------- random


def test_random_spread_within_bounds() -> None:
    hs = make_hosts(4)
    lb = RandomLB(random.Random(10))
    n = 8000
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(n))  # type: ignore[union-attr]
    sd = (n * 0.25 * 0.75) ** 0.5
    for h in hs:
        assert abs(c[h.key] - n / 4) < 5 * sd


def test_random_weighted() -> None:
    hs = make_hosts(3, weights=[1, 1, 2])
    lb = RandomLB(random.Random(11))
    n = 8000
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(n))  # type: ignore[union-attr]
    assert abs(c[hs[2].key] - n / 2) < 5 * (n * 0.25) ** 0.5


def test_same_seed_same_sequence() -> None:
    hs = make_hosts(5)
    a = RandomLB(random.Random(42))
    b = RandomLB(random.Random(42))
    assert [a.pick(hs, LbContext()) for _ in range(50)] == [
        b.pick(hs, LbContext()) for _ in range(50)
    ]


# ---------------------------------------------------------------- passthrough


def test_passthrough_first_host() -> None:
    hs = make_hosts(3)
    lb = PassthroughLB()
    assert lb.pick(hs, LbContext()) is hs[0]
    assert lb.pick(hs[1:], LbContext()) is hs[1]


# ---------------------------------------------------------------- consistent hash


def keyed(name: str) -> tuple[RingHashLB, list[Host]]:
    hs = make_hosts(5)
    lb = make_load_balancer(POLICIES[name], random.Random(12))
    assert isinstance(lb, RingHashLB)
    lb.set_hosts(hs)
    return lb, hs


@pytest.mark.parametrize("name", ["hash_header", "hash_cookie", "hash_source_ip", "hash_query"])
def test_consistent_hash_sticky_and_spread(name: str) -> None:
    lb, hs = keyed(name)
    owners = {}
    for i in range(200):
        first = lb.pick(hs, ctx_for(i))
        assert all(lb.pick(hs, ctx_for(i)) is first for _ in range(5))
        owners[i] = first
    c = collections.Counter(h.key for h in owners.values() if h)
    assert len(c) == 5  # keys spread over every host
    assert max(c.values()) < 200 * 0.4


def test_consistent_hash_is_stable_across_instances() -> None:
    """Stable hash (not Python's salted hash): another sidecar maps a key the same way."""
    lb1, hs = keyed("hash_header")
    lb2 = make_load_balancer(POLICIES["hash_header"], random.Random(99))
    lb2.set_hosts(hs)
    for i in range(100):
        assert lb1.pick(hs, ctx_for(i)) is lb2.pick(hs, ctx_for(i))


def test_consistent_hash_header_name_case_insensitive() -> None:
    lb = make_load_balancer(
        LoadBalancer(consistent_hash=ConsistentHash(http_header_name="X-User")), random.Random(1)
    )
    hs = make_hosts(5)
    lb.set_hosts(hs)
    got = {lb.pick(hs, LbContext(headers={"x-user": "alice"})) for _ in range(10)}
    assert len(got) == 1


def test_consistent_hash_minimal_remapping_when_host_ejected() -> None:
    lb, hs = keyed("hash_header")
    before = {i: lb.pick(hs, ctx_for(i)) for i in range(1000)}
    gone = hs[2]
    remaining = [h for h in hs if h is not gone]
    after = {i: lb.pick(remaining, ctx_for(i)) for i in range(1000)}
    moved = [i for i in before if before[i] is not after[i]]
    assert all(before[i] is gone for i in moved)  # only the gone host's keys move
    assert all(after[i] is not gone for i in after)
    assert len(moved) == sum(1 for h in before.values() if h is gone)
    # its keys spread over several hosts, not all onto one neighbour
    assert len({after[i].key for i in moved if after[i]}) >= 3


def test_consistent_hash_minimal_remapping_when_host_leaves_cluster() -> None:
    hs = make_hosts(5)
    lb5 = make_load_balancer(POLICIES["hash_header"], random.Random(1))
    lb5.set_hosts(hs)
    before = {i: lb5.pick(hs, ctx_for(i)) for i in range(1000)}
    remaining = hs[:2] + hs[3:]
    lb4 = make_load_balancer(POLICIES["hash_header"], random.Random(1))
    lb4.set_hosts(remaining)
    after = {i: lb4.pick(remaining, ctx_for(i)) for i in range(1000)}
    for i, owner in before.items():
        if owner is not hs[2]:
            assert after[i] is owner


def test_consistent_hash_host_added_takes_about_its_share() -> None:
    hs = make_hosts(5)
    lb4 = make_load_balancer(POLICIES["hash_header"], random.Random(1))
    lb4.set_hosts(hs[:4])
    before = {i: lb4.pick(hs[:4], ctx_for(i)) for i in range(2000)}
    lb5 = make_load_balancer(POLICIES["hash_header"], random.Random(1))
    lb5.set_hosts(hs)
    after = {i: lb5.pick(hs, ctx_for(i)) for i in range(2000)}
    moved = [i for i in before if before[i] is not after[i]]
    assert all(after[i] is hs[4] for i in moved)  # keys only move to the new host
    assert 0.1 < len(moved) / 2000 < 0.3  # about 1/5


def test_consistent_hash_missing_key_picks_randomly() -> None:
    lb, hs = keyed("hash_header")
    c = collections.Counter(lb.pick(hs, LbContext()).key for _ in range(2000))  # type: ignore[union-attr]
    assert len(c) == 5 and min(c.values()) > 200


def test_consistent_hash_cookie_generated_when_missing() -> None:
    lb, hs = keyed("hash_cookie")
    ctx = LbContext(headers={})
    h = lb.pick(hs, ctx)
    assert ctx.cookie_to_set is not None
    name, value, ttl = ctx.cookie_to_set
    assert name == "session" and ttl == 60.0 and len(value) == 16
    # the client sends the cookie back and sticks to the same host
    for _ in range(10):
        ctx2 = LbContext(headers={"cookie": f"session={value}"})
        assert lb.pick(hs, ctx2) is h
        assert ctx2.cookie_to_set is None


def test_consistent_hash_cookie_without_ttl_is_not_generated() -> None:
    lb = make_load_balancer(
        LoadBalancer(consistent_hash=ConsistentHash(http_cookie="session")), random.Random(1)
    )
    hs = make_hosts(3)
    ctx = LbContext()
    assert lb.pick(hs, ctx) is not None
    assert ctx.cookie_to_set is None


def test_cookie_value_parsing() -> None:
    assert cookie_value("a=1; session=xyz; b=2", "session") == "xyz"
    assert cookie_value('session="q"', "session") == "q"
    assert cookie_value("sessionx=1", "session") is None
    assert cookie_value("", "session") is None


def test_consistent_hash_weighted_share() -> None:
    hs = make_hosts(2, weights=[1, 3])
    lb = make_load_balancer(POLICIES["hash_header"], random.Random(1))
    lb.set_hosts(hs)
    c = collections.Counter(lb.pick(hs, ctx_for(i)).key for i in range(4000))  # type: ignore[union-attr]
    assert 0.68 < c[hs[1].key] / 4000 < 0.82

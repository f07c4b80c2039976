"""Load balancers: pick one host among the available ones (Istio's LoadBalancerSettings).

Theory of operation
-------------------
``make_load_balancer(policy, rng)`` returns an object with ``pick(hosts, ctx)``. ``hosts`` are
already filtered to available ones (healthy, not ejected, maybe minus hosts a retry already
tried); an empty list gives ``None``. ``ClusterState`` passes the *same list object* as long as
availability does not change, so implementations cache per-list work keyed by identity.
``set_hosts(all_hosts)`` tells an implementation the cluster's full host set (the hash ring is
built over it, so ejecting a host only moves that host's keys).

- ``ROUND_ROBIN``: rotate; with unequal endpoint weights, smooth weighted round robin.
- ``LEAST_REQUEST`` (Istio's default): power of two random choices on ``active_requests``
  (Envoy's ``choice_count`` 2); with unequal weights, a weighted random choice on
  ``weight / (active + 1)`` (Envoy's ``active_request_bias`` 1.0).
- ``RANDOM``: uniform (or weighted) random.
- ``PASSTHROUGH``: Istio forwards to the original destination; diktyo's clusters carry that
  destination as their first endpoint, so the first available host is used.
- ``consistentHash``: a hash ring (Istio's default ``ringHash``) keyed by header, cookie, source
  IP or query parameter; no key -> a random host (as Envoy). A missing ``httpCookie`` with a
  ttl makes a new random cookie value: ``ctx.cookie_to_set = (name, value, ttl)``.
"""

from __future__ import annotations

import bisect
import random
from typing import Protocol

from diktyo.proxy.upstream.host import Host
from diktyo.snapshot.model import ConsistentHash, LoadBalancer

try:  # what hashlib.blake2b is; hashlib also loads OpenSSL's _hashlib: ~0.6 MiB RSS (issue 11)
    from _blake2 import blake2b
except ImportError:  # a Python built without its own BLAKE2
    from hashlib import blake2b

_EMPTY: dict[str, str] = {}

# Points on the ring per unit of endpoint weight. Fixed per host (Envoy scales points so the
# ring has >= 1024 entries overall), so a host joining or leaving moves only its own keys.
RING_POINTS_PER_HOST = 256
MAX_RING_SIZE = 8 * 1024 * 1024


class LbContext:
    """What a load balancer may look at for one request."""

    __slots__ = ("cookie_to_set", "headers", "query", "source_ip")

    def __init__(
        self,
        headers: dict[str, str] | None = None,
        source_ip: str = "",
        query: dict[str, str] | None = None,
    ) -> None:
        self.headers = headers if headers is not None else _EMPTY  # lower-case names
        self.source_ip = source_ip
        self.query = query if query is not None else _EMPTY
        self.cookie_to_set: tuple[str, str, float] | None = None


class LoadBalancerImpl(Protocol):
    name: str

    def pick(self, hosts: list[Host], ctx: LbContext) -> Host | None: ...

    def set_hosts(self, hosts: list[Host]) -> None: ...


def _all_weights_equal(hosts: list[Host]) -> bool:
    if not hosts:
        return True
    w = hosts[0].weight
    return all(h.weight == w for h in hosts)


class RoundRobinLB:
    """Rotate through hosts; smooth weighted round robin when weights differ."""

    __slots__ = ("_current", "_last", "_next", "_weighted", "name")

    def __init__(self, rng: random.Random) -> None:
        self.name = "ROUND_ROBIN"
        self._next = rng.randrange(1 << 16)  # random start, so sidecars do not all begin at host 0
        self._last: list[Host] | None = None
        self._weighted = False
        self._current: dict[tuple[str, int], int] = {}

    def set_hosts(self, hosts: list[Host]) -> None:
        self._current.clear()

    def pick(self, hosts: list[Host], ctx: LbContext) -> Host | None:
        n = len(hosts)
        if n == 0:
            return None
        if hosts is not self._last:
            self._last = hosts
            self._weighted = not _all_weights_equal(hosts)
        if not self._weighted:
            i = self._next
            self._next = i + 1
            return hosts[i % n]
        # smooth weighted round robin (nginx): deterministic, well interleaved
        cur = self._current
        total = 0
        best: Host | None = None
        best_val = 0
        for h in hosts:
            v = cur.get(h.key, 0) + h.weight
            cur[h.key] = v
            total += h.weight
            if best is None or v > best_val:
                best, best_val = h, v
        assert best is not None
        cur[best.key] = best_val - total
        return best


class LeastRequestLB:
    """Power of two choices on active requests (Envoy's default ``choice_count`` 2)."""

    __slots__ = ("_last", "_rand", "_weighted", "name")

    def __init__(self, rng: random.Random) -> None:
        self.name = "LEAST_REQUEST"
        self._rand = rng.random
        self._last: list[Host] | None = None
        self._weighted = False

    def set_hosts(self, hosts: list[Host]) -> None:
        pass

    def pick(self, hosts: list[Host], ctx: LbContext) -> Host | None:
        n = len(hosts)
        if n <= 1:
            return hosts[0] if n else None
        if hosts is not self._last:
            self._last = hosts
            self._weighted = not _all_weights_equal(hosts)
        rand = self._rand
        if not self._weighted:
            a = hosts[int(rand() * n)]
            b = hosts[int(rand() * n)]
            return b if b.active_requests < a.active_requests else a
        # weighted: effective weight = weight / (active + 1) (active_request_bias 1.0)
        total = 0.0
        for h in hosts:
            total += h.weight / (h.active_requests + 1)
        r = rand() * total
        for h in hosts:
            r -= h.weight / (h.active_requests + 1)
            if r < 0:
                return h
        return hosts[-1]


class RandomLB:
    """Uniform random (weighted random when weights differ)."""

    __slots__ = ("_cum", "_last", "_rand", "name")

    def __init__(self, rng: random.Random) -> None:
        self.name = "RANDOM"
        self._rand = rng.random
        self._last: list[Host] | None = None
        self._cum: list[int] | None = None

    def set_hosts(self, hosts: list[Host]) -> None:
        pass

    def pick(self, hosts: list[Host], ctx: LbContext) -> Host | None:
        n = len(hosts)
        if n == 0:
            return None
        if hosts is not self._last:
            self._last = hosts
            if _all_weights_equal(hosts):
                self._cum = None
            else:
                acc = 0
                cum_w: list[int] = []
                for h in hosts:
                    acc += h.weight
                    cum_w.append(acc)
                self._cum = cum_w
        cum = self._cum
        if cum is None:
            return hosts[int(self._rand() * n)]
        return hosts[bisect.bisect_right(cum, self._rand() * cum[-1])]


class PassthroughLB:
    """Istio PASSTHROUGH: the original destination, i.e. the first available endpoint."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "PASSTHROUGH"

    def set_hosts(self, hosts: list[Host]) -> None:
        pass

    def pick(self, hosts: list[Host], ctx: LbContext) -> Host | None:
        return hosts[0] if hosts else None


def hash64(value: str) -> int:
    """Stable 64-bit hash (same in every process, unlike ``hash()``)."""
    return int.from_bytes(blake2b(value.encode(), digest_size=8).digest(), "big")


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` request header, or None."""
    for part in cookie_header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"')
    return None


class RingHashLB:
    """Consistent hash on a ring (Istio ``consistentHash``, ring hash)."""

    __slots__ = (
        "_explicit",
        "_last",
        "_last_all",
        "_last_members",
        "_points",
        "_ring_hosts",
        "_ring_ids",
        "_rng",
        "cfg",
        "name",
    )

    def __init__(self, cfg: ConsistentHash, rng: random.Random) -> None:
        self.name = "CONSISTENT_HASH"
        self.cfg = cfg
        self._rng = rng
        self._points: list[int] = []
        self._ring_hosts: list[Host] = []
        self._ring_ids: frozenset[int] = frozenset()
        self._explicit = False
        self._last: list[Host] | None = None
        self._last_members: frozenset[int] = frozenset()
        self._last_all = False

    def set_hosts(self, hosts: list[Host]) -> None:
        self._explicit = True
        self._build(hosts)

    def _build(self, hosts: list[Host]) -> None:
        entries: list[tuple[int, int]] = []
        per = RING_POINTS_PER_HOST
        min_w = min((h.weight for h in hosts), default=1)
        total_w = sum(h.weight for h in hosts) or 1
        # keep the ring under MAX_RING_SIZE however skewed the weights are
        scale = min(per / min_w, MAX_RING_SIZE / total_w) if hosts else per
        for idx, h in enumerate(hosts):
            count = max(1, round(h.weight * scale))
            base = f"{h.address}:{h.port}_"
            for i in range(count):
                entries.append((hash64(base + str(i)), idx))
        entries.sort()
        self._points = [p for p, _ in entries]
        self._ring_hosts = [hosts[i] for _, i in entries]
        self._ring_ids = frozenset(id(h) for h in hosts)
        self._last = None

    def hash_key(self, ctx: LbContext) -> str | None:
        """The request's hash key per the policy; may set ``ctx.cookie_to_set``."""
        cfg = self.cfg
        if cfg.http_header_name:
            return ctx.headers.get(cfg.http_header_name.lower())
        if cfg.http_cookie:
            raw = ctx.headers.get("cookie")
            if raw:
                v = cookie_value(raw, cfg.http_cookie)
                if v is not None:
                    return v
            if cfg.http_cookie_ttl is not None:
                value = f"{self._rng.getrandbits(64):016x}"
                ctx.cookie_to_set = (cfg.http_cookie, value, cfg.http_cookie_ttl)
                return value
            return None
        if cfg.use_source_ip:
            return ctx.source_ip or None
        if cfg.http_query_parameter_name:
            return ctx.query.get(cfg.http_query_parameter_name)
        return None

    def pick(self, hosts: list[Host], ctx: LbContext) -> Host | None:
        if not hosts:
            return None
        if hosts is not self._last:
            members = frozenset(id(h) for h in hosts)
            if not members <= self._ring_ids:
                if self._explicit:
                    # hosts outside the configured set: ring over the union
                    all_hosts = list(self._ring_hosts_unique()) + [
                        h for h in hosts if id(h) not in self._ring_ids
                    ]
                    self._build(all_hosts)
                else:
                    self._build(hosts)
            self._last = hosts
            self._last_members = members
            self._last_all = members == self._ring_ids
        key = self.hash_key(ctx)
        h = hash64(key) if key is not None else self._rng.getrandbits(64)
        points = self._points
        n = len(points)
        idx = bisect.bisect_left(points, h)
        if idx == n:
            idx = 0
        ring = self._ring_hosts
        if self._last_all:
            return ring[idx]
        members = self._last_members
        for _ in range(n):
            host = ring[idx]
            if id(host) in members:
                return host
            idx += 1
            if idx == n:
                idx = 0
        return None

    def _ring_hosts_unique(self) -> list[Host]:
        seen: dict[int, Host] = {}
        for h in self._ring_hosts:
            seen.setdefault(id(h), h)
        return list(seen.values())


def make_load_balancer(policy: LoadBalancer, rng: random.Random) -> LoadBalancerImpl:
    """The load balancer for a cluster's ``LoadBalancer`` policy."""
    if policy.consistent_hash is not None:
        return RingHashLB(policy.consistent_hash, rng)
    simple = policy.simple
    if simple == "ROUND_ROBIN":
        return RoundRobinLB(rng)
    if simple == "RANDOM":
        return RandomLB(rng)
    if simple == "PASSTHROUGH":
        return PassthroughLB()
    return LeastRequestLB(rng)  # LEAST_REQUEST, Istio's default (and UNSPECIFIED)

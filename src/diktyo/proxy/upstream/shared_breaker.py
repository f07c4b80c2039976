"""Circuit-breaker counts shared by a sidecar's worker processes (``concurrency: N``).

Theory of operation
-------------------
Envoy's circuit-breaker limits hold for the whole proxy, not per worker thread. diktyo's
workers are processes, so the counts live in one shared memory file (a ``memfd`` the leader
creates and every worker maps): per cluster, per resource (connections, pending, requests,
retries), **one slot per worker**. A worker only ever writes its own slots; the current total
is the sum of the N slots.

- Releasing (``end_request``, ``connection_closed``, ...) decrements the worker's own slot:
  one store, no lock.
- Admitting (``try_start_request``, ``can_open_connection``, ...) under a *finite* limit must
  check the total and take a slot in one step, or two workers could both see ``0 of 1`` and
  both go ahead. It holds a POSIX record lock (``fcntl.lockf``) on the cluster's byte of the
  file for that step: two system calls, about 1-2 µs. Under Istio's defaults (limits of
  2^32-1, effectively unlimited) admission takes the slot without the lock.
- ``can_open_connection`` returning True *reserves* the connection (the pools and the TCP
  proxy call ``connection_opened`` right after it, synchronously); ``connection_opened`` then
  consumes the reservation instead of counting twice.

The attributes ``connections``, ``pending``, ``requests`` and ``retries`` stay this worker's
own counts (so gauges such as ``upstream_cx_active`` sum correctly across workers); the limit
checks, ``describe()`` and overflow messages use the totals.

Cluster names map to slot rows through ``SharedCounts.row``: the leader assigns rows as
clusters appear and sends the table to the workers with every snapshot. Rows are never reused
while the sidecar runs (a request of a removed cluster may still release its slot); past
``MAX_CLUSTERS`` a cluster gets a per-worker breaker and a warning. When a worker dies the
leader zeroes its slots (its connections and requests died with it).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from typing import Any

from diktyo.proxy.upstream.circuit_breaker import CircuitBreaker
from diktyo.snapshot.model import ConnectionPool

log = logging.getLogger("diktyo.proxy")

MAX_WORKERS = 64
MAX_CLUSTERS = 4096
RESOURCES = ("connections", "pending", "requests", "retries")
_CX, _PENDING, _RQ, _RETRY = 0, 1, 2, 3
PENDING = _PENDING
# limits at or above this are Istio's "unlimited" defaults: no lock needed to admit
UNLIMITED = 2**31


class SharedCounts:
    """The shared memory file: ``[cluster row][resource][worker]`` 64-bit counts."""

    def __init__(self, fd: int, worker: int, workers: int) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"concurrency {workers}: expected 1..{MAX_WORKERS} workers")
        self.fd = fd
        self.worker = worker
        self.workers = workers
        self.row_size = len(RESOURCES) * workers  # slots per cluster
        size = MAX_CLUSTERS * self.row_size * 8
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size)
        self.slots = memoryview(self.map).cast("q")
        self.rows: dict[str, int] = {}
        self._warned = False

    @classmethod
    def create(cls, workers: int) -> SharedCounts:
        """The leader's (worker 0's) file; workers get its descriptor."""
        fd = os.memfd_create("diktyo-breakers", 0)  # pages come into being only when touched
        return cls(fd, 0, workers)

    def row(self, cluster: str, assign: bool) -> int | None:
        r = self.rows.get(cluster)
        if r is None and assign and len(self.rows) < MAX_CLUSTERS:
            r = self.rows[cluster] = len(self.rows)
        if r is None and not self._warned:
            self._warned = True
            log.warning(
                "cluster %s gets a per-worker circuit breaker: %s", cluster,
                f"more than {MAX_CLUSTERS} clusters were seen" if assign
                else "the leader sent no shared slot for it",
            )  # fmt: skip
        return r

    def clear_worker(self, worker: int) -> None:
        """A dead worker's connections and requests are gone: zero its slots."""
        slots = self.slots
        for r in range(len(self.rows)):
            base = r * self.row_size + worker
            for res in range(len(RESOURCES)):
                slots[base + res * self.workers] = 0

    def close(self) -> None:
        self.slots.release()
        self.map.close()


class SharedCircuitBreaker(CircuitBreaker):
    """A ``CircuitBreaker`` whose limits hold across the sidecar's worker processes."""

    __slots__ = ("_base", "_fd", "_n", "_reserved", "_rq_slot", "_slots", "_worker")

    def __init__(self, pool: ConnectionPool, source: str, shared: SharedCounts, row: int) -> None:
        super().__init__(pool, source)
        self._slots = shared.slots
        self._fd = shared.fd
        self._n = shared.workers
        self._worker = shared.worker
        self._base = row * shared.row_size  # resource r of worker w: base + r * n + w
        self._reserved = 0
        self._rq_slot = self._base + _RQ * self._n + self._worker  # the per-request one

    # -- totals
    def total(self, res: int) -> int:
        b = self._base + res * self._n
        return sum(self._slots[b : b + self._n])

    def _add(self, res: int, delta: int) -> None:
        # deltas, not this object's count: a cluster removed and added again gets a new
        # breaker on the same row while requests of the old one still release theirs
        self._slots[self._base + res * self._n + self._worker] += delta

    def _admit(self, res: int, limit: int) -> bool:
        """Check the total against ``limit`` and take one slot, atomically across workers."""
        row = self._base
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, row)
        try:
            b = row + res * self._n
            if sum(self._slots[b : b + self._n]) >= limit:
                return False
            self._slots[b + self._worker] += 1
            return True
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, row)

    # -- connections
    def can_open_connection(self) -> bool:
        if self.max_connections >= UNLIMITED:
            self._add(_CX, 1)
        elif not self._admit(_CX, self.max_connections):
            self.counters["upstream_cx_overflow"] += 1
            return False
        self.connections += 1
        self._reserved += 1
        return True

    def connection_capacity(self) -> bool:
        return self.total(_CX) < self.max_connections

    def connection_opened(self) -> None:
        if self._reserved:
            self._reserved -= 1  # counted when can_open_connection admitted it
            return
        self.connections += 1
        self._add(_CX, 1)

    def connection_closed(self) -> None:
        if self.connections > 0:
            self.connections -= 1
            self._add(_CX, -1)

    # -- pending queue
    def try_enter_pending(self) -> bool:
        if self.max_pending >= UNLIMITED:
            self._add(_PENDING, 1)
        elif not self._admit(_PENDING, self.max_pending):
            self.counters["upstream_rq_pending_overflow"] += 1
            return False
        self.pending += 1
        return True

    def leave_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1
            self._add(_PENDING, -1)

    # -- requests in flight
    def try_start_request(self) -> bool:
        if self.max_requests >= UNLIMITED:
            self._slots[self._rq_slot] += 1  # _add inlined: once per request
        elif not self._admit(_RQ, self.max_requests):
            self.counters["upstream_rq_pending_overflow"] += 1
            return False
        self.requests += 1
        return True

    def end_request(self) -> None:
        if self.requests > 0:
            self.requests -= 1
            self._slots[self._rq_slot] -= 1

    # -- retries in flight
    def try_start_retry(self) -> bool:
        if self.max_retries >= UNLIMITED:
            self._add(_RETRY, 1)
        elif not self._admit(_RETRY, self.max_retries):
            self.counters["upstream_rq_retry_overflow"] += 1
            return False
        self.retries += 1
        return True

    def end_retry(self) -> None:
        if self.retries > 0:
            self.retries -= 1
            self._add(_RETRY, -1)

    # -- reporting: totals of the whole sidecar
    def _totals(self) -> dict[str, int]:
        return {name: self.total(i) for i, name in enumerate(RESOURCES)}

    def overflow_message(self, what: str) -> str:
        mine = (self.connections, self.pending, self.requests, self.retries)
        t = self._totals()
        self.connections, self.pending = t["connections"], t["pending"]
        self.requests, self.retries = t["requests"], t["retries"]
        try:
            return super().overflow_message(what)
        finally:
            self.connections, self.pending, self.requests, self.retries = mine

    def is_open(self, what: str) -> bool:
        from diktyo.proxy.upstream.circuit_breaker import _ALIASES, _RESOURCES

        cur_attr, max_attr, _, _ = _RESOURCES[_ALIASES.get(what, what)]
        return bool(self.total(RESOURCES.index(cur_attr)) >= getattr(self, max_attr))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["current"] = self._totals()
        d["this_worker"] = {
            "worker": self._worker,
            "connections": self.connections,
            "pending": self.pending,
            "requests": self.requests,
            "retries": self.retries,
        }
        return d


# the sidecar's shared counts while it runs workers (set by diktyo.proxy.workers)
SHARED: SharedCounts | None = None
ASSIGN_ROWS = False  # True in the leader, which hands out rows


def new_breaker(cluster: str, pool: ConnectionPool, source: str) -> CircuitBreaker:
    """The breaker for a new cluster state: shared across workers when there are workers."""
    shared = SHARED
    if shared is None:
        return CircuitBreaker(pool, source)
    row = shared.row(cluster, ASSIGN_ROWS)
    if row is None:
        return CircuitBreaker(pool, source)
    return SharedCircuitBreaker(pool, source, shared, row)

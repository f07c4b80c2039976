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
checks, ``describe()`` and overflow messages use the totals. A worker's breaker is the same
compiled ``circuit_breaker.CircuitBreaker`` as without workers, with a ``SharedSlots`` (this
module) as its ``shared`` delegate (issue 11, `lean`: a subclass kept the breaker out of the
compiled hot path, two Python calls per request).

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

from diktyo.proxy.upstream.circuit_breaker import RESOURCES, RQ, CircuitBreaker
from diktyo.snapshot.model import ConnectionPool

log = logging.getLogger("diktyo.proxy")

MAX_WORKERS = 64
MAX_CLUSTERS = 4096
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


class SharedSlots:
    """One cluster's row of the shared counts, as this worker's ``CircuitBreaker`` uses it
    (its ``shared`` delegate, ``circuit_breaker.SharedSlots``): admission under a limit,
    releases, totals."""

    __slots__ = ("_base", "_fd", "_n", "_rq_slot", "_slots", "reserved", "worker")

    def __init__(self, shared: SharedCounts, row: int) -> None:
        self._slots = shared.slots
        self._fd = shared.fd
        self._n = shared.workers
        self.worker = shared.worker
        self._base = row * shared.row_size  # resource r of worker w: base + r * n + w
        self.reserved = 0  # connections admitted by can_open_connection, not yet opened
        self._rq_slot = self._base + RQ * self._n + self.worker  # the per-request one

    def total(self, res: int) -> int:
        b = self._base + res * self._n
        return sum(self._slots[b : b + self._n])

    def add(self, res: int, delta: int) -> None:
        # deltas, not the breaker's count: a cluster removed and added again gets a new
        # breaker on the same row while requests of the old one still release theirs
        if res == RQ:
            self._slots[self._rq_slot] += delta  # once per request: no index arithmetic
        else:
            self._slots[self._base + res * self._n + self.worker] += delta

    def admit(self, res: int, limit: int) -> bool:
        """Check the total against ``limit`` and take one slot, atomically across workers
        (Istio's "unlimited" defaults: taken without the lock)."""
        if limit >= UNLIMITED:
            self.add(res, 1)
            return True
        row = self._base
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, row)
        try:
            b = row + res * self._n
            if sum(self._slots[b : b + self._n]) >= limit:
                return False
            self._slots[b + self.worker] += 1
            return True
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, row)


def shared_circuit_breaker(
    pool: ConnectionPool, source: str, shared: SharedCounts, row: int
) -> CircuitBreaker:
    """A ``CircuitBreaker`` whose limits hold across the sidecar's worker processes."""
    return CircuitBreaker(pool, source, SharedSlots(shared, row))


def is_shared(breaker: CircuitBreaker) -> bool:
    """True for a breaker whose counts are shared across workers."""
    return breaker.shared is not None


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
    return shared_circuit_breaker(pool, source, shared, row)

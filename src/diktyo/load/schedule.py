"""When each request of a load run goes out (pure; the caller passes the current time).

Theory of operation: each connection has its own ``Schedule``, as each of fortio's threads
does: ``split_requests`` gives every connection its share of the request count (fortio's
``-n`` is "exactly n calls", n/c per connection), and each runs at ``qps / connections``.
So a connection whose requests fail fast (503 from an open circuit breaker) does not use up
the requests of the others. ``next(now)`` hands out the next request slot or ``None`` when
the run is over. A run is bounded by a request count, a duration, or both (whichever ends
first). With ``qps > 0`` slot *i* is due at ``start + i / qps`` (a late slot is sent at once
and the rate catches up); with ``qps == 0`` every slot is due now.
"""

from __future__ import annotations


class Schedule:
    __slots__ = ("duration", "issued", "qps", "requests", "start")

    def __init__(
        self, *, start: float, requests: int | None, duration: float | None, qps: float = 0.0
    ) -> None:
        if requests is None and duration is None:
            raise ValueError("a load run needs a request count or a duration (or both)")
        if requests is not None and requests < 0:
            raise ValueError(f"request count must be >= 0, got {requests}")
        if duration is not None and duration < 0:
            raise ValueError(f"duration must be >= 0, got {duration}")
        if qps < 0:
            raise ValueError(f"qps must be >= 0 (0 means as fast as possible), got {qps}")
        self.start = start
        self.requests = requests
        self.duration = duration
        self.qps = qps
        self.issued = 0

    def stop(self) -> None:
        """End the run now: no more slots are handed out (e.g. on Ctrl-C)."""
        self.requests = self.issued

    @property
    def end(self) -> float | None:
        return None if self.duration is None else self.start + self.duration

    def next(self, now: float) -> float | None:
        """Claim the next request: the time it is due (may be in the past), or None when done."""
        if self.requests is not None and self.issued >= self.requests:
            return None
        due = self.start + self.issued / self.qps if self.qps > 0 else now
        due = max(due, self.start)
        end = self.end
        if end is not None and (now >= end or due >= end):
            return None
        self.issued += 1
        return due


def split_requests(total: int | None, connections: int) -> list[int | None]:
    """Each connection's share of ``total`` requests (None: no count, the run has a duration).

    Like fortio's ``-n`` with ``-c``: ``total // connections`` each; the remainder goes one
    each to the first connections.
    """
    if connections < 1:
        raise ValueError(f"connections must be >= 1, got {connections}")
    if total is None:
        return [None] * connections
    base, extra = divmod(total, connections)
    return [base + (1 if i < extra else 0) for i in range(connections)]

"""Load results as they are recorded: status-code counts, error kinds and latencies (pure).

Errors (refused connections, resets, timeouts, malformed responses) are counted as code
``-1`` like fortio does, and by kind. Percentiles interpolate linearly between the two
nearest recorded latencies (numpy's default, "linear"), so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

ERROR_CODE = -1
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 75.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of already sorted values; NaN when there are none."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be between 0 and 100, got {p}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = p / 100.0 * (n - 1)
    low = math.floor(rank)
    high = min(low + 1, n - 1)
    frac = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latencies in seconds."""

    count: int
    min: float
    max: float
    avg: float
    stdev: float
    percentiles: tuple[tuple[float, float], ...]  # (p, seconds)


class Recorder:
    """Collects one outcome per request; ``summary()`` computes the latency statistics."""

    __slots__ = ("_latencies", "codes", "errors")

    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self._latencies = array("d")

    @property
    def count(self) -> int:
        return len(self._latencies)

    def record(self, status: int, latency: float) -> None:
        """A response with HTTP ``status`` after ``latency`` seconds."""
        self.codes[status] += 1
        self._latencies.append(latency)

    def record_error(self, kind: str, latency: float) -> None:
        """A request that got no HTTP response (``kind`` e.g. "connection refused")."""
        self.codes[ERROR_CODE] += 1
        self.errors[kind] += 1
        self._latencies.append(latency)

    def summary(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> LatencySummary:
        values = sorted(self._latencies)
        n = len(values)
        if n == 0:
            nan = math.nan
            return LatencySummary(0, nan, nan, nan, nan, tuple((p, nan) for p in percentiles))
        avg = math.fsum(values) / n
        variance = math.fsum((v - avg) ** 2 for v in values) / n
        return LatencySummary(
            count=n,
            min=values[0],
            max=values[-1],
            avg=avg,
            stdev=math.sqrt(variance),
            percentiles=tuple((p, percentile(values, p)) for p in percentiles),
        )

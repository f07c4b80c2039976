"""Time and randomness come from here, so tests can use virtual time and fixed seeds."""

from __future__ import annotations

import random as _random
import time as _time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    __slots__ = ()

    def monotonic(self) -> float:
        return _time.monotonic()

    def time(self) -> float:
        return _time.time()


class ManualClock:
    """Virtual time for tests: advances only when told."""

    __slots__ = ("now", "wall")

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self.wall = wall

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SYSTEM_CLOCK = SystemClock()


def make_random(seed: int | None = None) -> _random.Random:
    """The one place that creates random sources; pass a seed in tests."""
    return _random.Random(seed)

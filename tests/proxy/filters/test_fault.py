"""Fault injection decisions, checked statistically with fixed seeds."""

from __future__ import annotations

import random

from diktyo.proxy.filters.fault import decide_fault
from diktyo.snapshot.model import Fault, FaultAbort, FaultDelay


def draws(fault: Fault, n: int, seed: int = 1) -> list[tuple[float | None, int | None]]:
    rng = random.Random(seed)
    return [decide_fault(fault, rng) for _ in range(n)]


def test_no_fault() -> None:
    assert decide_fault(None, random.Random(1)) == (None, None)
    assert decide_fault(Fault(), random.Random(1)) == (None, None)


def test_full_percentages() -> None:
    f = Fault(delay=FaultDelay(fixed_delay=2.0), abort=FaultAbort(http_status=503))
    assert all(d == (2.0, 503) for d in draws(f, 100))


def test_zero_percent_never() -> None:
    f = Fault(
        delay=FaultDelay(fixed_delay=2.0, percentage=0.0),
        abort=FaultAbort(http_status=503, percentage=0.0),
    )
    assert all(d == (None, None) for d in draws(f, 1000))


def test_ten_percent_abort_within_bounds() -> None:
    n = 10_000
    got = sum(
        1
        for _, a in draws(Fault(abort=FaultAbort(http_status=500, percentage=10.0)), n)
        if a == 500
    )
    sd = (n * 0.1 * 0.9) ** 0.5  # 30
    assert abs(got - 1000) < 4 * sd


def test_fractional_percentage() -> None:
    n = 20_000
    got = sum(
        1 for d, _ in draws(Fault(delay=FaultDelay(fixed_delay=0.1, percentage=0.5)), n) if d == 0.1
    )
    assert 50 < got < 150  # expected 100


def test_delay_and_abort_independent() -> None:
    n = 10_000
    f = Fault(
        delay=FaultDelay(fixed_delay=1.0, percentage=50.0),
        abort=FaultAbort(http_status=503, percentage=50.0),
    )
    res = draws(f, n, seed=3)
    both = sum(1 for d, a in res if d is not None and a is not None)
    assert abs(both - n / 4) < 4 * (n * 0.25 * 0.75) ** 0.5


def test_fixed_seed_is_reproducible() -> None:
    f = Fault(abort=FaultAbort(http_status=503, percentage=30.0))
    assert draws(f, 200, seed=9) == draws(f, 200, seed=9)

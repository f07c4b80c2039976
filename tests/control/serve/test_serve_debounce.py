"""Debouncer: quiet period, max wait, merged count (virtual time)."""

from diktyo.control.serve.debounce import Debouncer
from diktyo.core.clock import ManualClock


def test_quiet_period_merges_burst() -> None:
    clock = ManualClock()
    d = Debouncer(quiet=0.1, max_wait=10)
    assert d.deadline() is None and not d.due(clock.monotonic())
    for _ in range(5):
        d.change(clock.monotonic())
        clock.advance(0.05)
    assert not d.due(clock.monotonic())  # last change 0.05 s ago
    clock.advance(0.06)
    assert d.due(clock.monotonic())
    assert d.fire() == 5
    assert not d.pending


def test_max_wait_bounds_a_steady_stream() -> None:
    clock = ManualClock()
    d = Debouncer(quiet=0.1, max_wait=1.0)
    fired_at = None
    for _ in range(100):
        d.change(clock.monotonic())
        clock.advance(0.05)
        if d.due(clock.monotonic()):
            fired_at = clock.monotonic()
            break
    assert fired_at is not None and abs(fired_at - 1001.0) < 0.06

"""Outlier detection on virtual time: Envoy's consecutive-error ejection as Istio configures it."""

from __future__ import annotations

from diktyo.core.clock import ManualClock
from diktyo.proxy.upstream.host import Host
from diktyo.proxy.upstream.outlier import OutlierDetector
from diktyo.snapshot.model import Endpoint, OutlierDetection


def make_hosts(n: int) -> list[Host]:
    return [Host(Endpoint(address=f"10.0.0.{i + 1}", port=8080)) for i in range(n)]


def detector(**kw: object) -> tuple[OutlierDetector, ManualClock]:
    clock = ManualClock(start=1000.0)
    return OutlierDetector(OutlierDetection(**kw), clock), clock  # type: ignore[arg-type]


def fail(
    od: OutlierDetector, h: Host, hosts: list[Host], times: int, status: int | None = 503
) -> list[bool]:
    return [od.record(h, status, False, hosts) for _ in range(times)]


def test_defaults_match_istio() -> None:
    od, _ = detector()
    assert od.threshold_5xx == 5
    assert od.threshold_gateway == 0
    assert od.interval == 10.0
    assert od.base_ejection_time == 30.0
    assert od.max_ejection_percent == 10.0


def test_ejects_after_five_consecutive_5xx() -> None:
    od, clock = detector(max_ejection_percent=100.0)
    hs = make_hosts(3)
    assert fail(od, hs[0], hs, 4, 500) == [False] * 4
    assert hs[0].available(clock.monotonic())
    assert od.record(hs[0], 500, False, hs)
    assert not hs[0].available(clock.monotonic())
    assert hs[0].ejection_count == 1
    assert od.counters["ejections_enforced_consecutive_5xx"] == 1


def test_success_resets_the_count() -> None:
    od, clock = detector(max_ejection_percent=100.0)
    hs = make_hosts(2)
    fail(od, hs[0], hs, 4)
    od.record(hs[0], 200, False, hs)
    assert fail(od, hs[0], hs, 4) == [False] * 4
    assert hs[0].available(clock.monotonic())
    od.record(hs[0], 404, False, hs)  # 4xx is not an error for outlier detection
    assert fail(od, hs[0], hs, 4) == [False] * 4


def test_resets_and_connect_failures_count_as_5xx() -> None:
    od, _clock = detector(max_ejection_percent=100.0)
    hs = make_hosts(2)
    results = fail(od, hs[0], hs, 5, None)
    assert results == [False] * 4 + [True]


def test_consecutive_5xx_zero_disables() -> None:
    od, clock = detector(consecutive_5xx_errors=0, max_ejection_percent=100.0)
    hs = make_hosts(2)
    assert not any(fail(od, hs[0], hs, 50, 500))
    assert hs[0].available(clock.monotonic())


def test_gateway_errors() -> None:
    od, _clock = detector(
        consecutive_5xx_errors=0, consecutive_gateway_errors=3, max_ejection_percent=100.0
    )
    hs = make_hosts(2)
    assert not any(fail(od, hs[0], hs, 10, 500))  # 500 is not a gateway error
    assert od.record(hs[0], 502, False, hs) is False
    assert od.record(hs[0], 500, False, hs) is False  # breaks the gateway run
    assert fail(od, hs[0], hs, 2, 504) == [False, False]
    assert od.record(hs[0], None, False, hs) is True  # connect failure = gateway error
    assert od.counters["ejections_enforced_consecutive_gateway_failure"] == 1
    # locally generated gateway errors (gateway_error=True) count too
    h = hs[1]
    assert [od.record(h, 503, True, hs) for _ in range(3)] == [False, False, True]


def test_ejection_time_is_base_times_count_on_interval_ticks() -> None:
    od, clock = detector(max_ejection_percent=100.0)  # interval 10 s, base 30 s
    hs = make_hosts(2)
    h = hs[0]
    clock.advance(3)  # t=1003
    assert fail(od, h, hs, 5)[-1]
    # Envoy un-ejects on the first interval tick >= ejected_at + 30 s: tick at 1040
    assert h.ejected_until == 1040.0
    for t in (1010, 1020, 1030, 1033, 1039.9):
        clock.now = t
        od.tick(hs)
        assert not h.available(clock.now), t
    clock.now = 1040.0
    assert h.available(clock.now)  # no tick needed to come back
    assert od.tick(hs) is True
    assert h.ejected_until == 0.0 and h.consecutive_5xx == 0
    assert od.counters["unejections_total"] == 1
    # second ejection right away: 2 x 30 s
    assert fail(od, h, hs, 5)[-1]
    assert h.ejection_count == 2 and h.eject_multiplier == 2
    assert h.ejected_until == 1100.0
    clock.now = 1099.0
    od.tick(hs)
    assert not h.available(clock.now)
    clock.now = 1100.0
    od.tick(hs)
    assert h.available(clock.now) and h.ejected_until == 0.0


def test_multiplier_decays_while_healthy() -> None:
    od, clock = detector(max_ejection_percent=100.0)
    hs = make_hosts(2)
    h = hs[0]
    for _ in range(3):
        fail(od, h, hs, 5)
        clock.now = h.ejected_until
        od.tick(hs)
    assert h.eject_multiplier == 3
    for _ in range(2):
        clock.advance(10)
        od.tick(hs)
    assert h.eject_multiplier == 1
    clock.advance(10)
    od.tick(hs)
    clock.advance(10)
    od.tick(hs)
    assert h.eject_multiplier == 0
    fail(od, h, hs, 5)
    assert h.ejected_until - h.ejected_at <= 30.0 + 10.0  # back to 1 x base


def test_ejection_time_capped_at_300s() -> None:
    od, clock = detector(max_ejection_percent=100.0, base_ejection_time=100.0, interval=1.0)
    hs = make_hosts(2)
    h = hs[0]
    for _ in range(6):
        fail(od, h, hs, 5)
        clock.now = h.ejected_until
        od.tick(hs)
    fail(od, h, hs, 5)
    assert h.ejected_until - h.ejected_at == 300.0


def test_max_ejection_percent_caps_ejections() -> None:
    od, _clock = detector()  # 10 %
    hs = make_hosts(10)
    assert fail(od, hs[0], hs, 5)[-1]
    assert not fail(od, hs[1], hs, 5)[-1]  # 2/10 = 20 % > 10 %
    assert od.counters["ejections_overflow"] == 1
    assert od.ejected_count(hs) == 1
    hs20 = make_hosts(20)
    od20, _ = detector()
    assert fail(od20, hs20[0], hs20, 5)[-1]
    assert fail(od20, hs20[1], hs20, 5)[-1]  # 2/20 = 10 % <= 10 %
    assert not fail(od20, hs20[2], hs20, 5)[-1]


def test_small_cluster_never_ejects_at_default_percent() -> None:
    """Envoy >= 1.28: no "at least one host" exception unless always_eject_one_host is set."""
    od, _clock = detector()  # 10 % of 3 hosts: one ejection would be 33 %
    hs = make_hosts(3)
    assert not any(fail(od, hs[0], hs, 20))
    assert od.counters["ejections_overflow"] == 4
    single = make_hosts(1)
    od1, c1 = detector(max_ejection_percent=100.0)  # Istio's circuit-breaking task setting
    assert fail(od1, single[0], single, 5)[-1]
    assert not single[0].available(c1.now)


def test_always_eject_one_host_option() -> None:
    clock = ManualClock(start=0.0)
    od = OutlierDetector(OutlierDetection(), clock, always_eject_one_host=True)
    hs = make_hosts(3)
    assert fail(od, hs[0], hs, 5)[-1]
    assert not fail(od, hs[1], hs, 5)[-1]


def test_max_ejection_percent_fifty() -> None:
    od, _clock = detector(max_ejection_percent=50.0)
    hs = make_hosts(4)
    assert fail(od, hs[0], hs, 5)[-1]
    assert fail(od, hs[1], hs, 5)[-1]
    assert not fail(od, hs[2], hs, 5)[-1]
    # 50 % of 3 hosts: one (33 %), not two (67 %, which Envoy before 1.27 allowed)
    od3, _ = detector(max_ejection_percent=50.0)
    hs3 = make_hosts(3)
    assert fail(od3, hs3[0], hs3, 5)[-1]
    assert not fail(od3, hs3[1], hs3, 5)[-1]


def test_ejected_host_not_ejected_twice() -> None:
    od, _clock = detector(max_ejection_percent=100.0)
    hs = make_hosts(2)
    fail(od, hs[0], hs, 5)
    assert not any(fail(od, hs[0], hs, 10))
    assert hs[0].ejection_count == 1


def test_update_keeps_tick_grid() -> None:
    od, clock = detector(max_ejection_percent=100.0)
    hs = make_hosts(2)
    clock.advance(3)
    fail(od, hs[0], hs, 5)
    od.update(OutlierDetection(max_ejection_percent=100.0, consecutive_5xx_errors=2))
    assert od.threshold_5xx == 2
    assert od.next_tick == 1010.0
    clock.now = 1040.0
    assert od.tick(hs)

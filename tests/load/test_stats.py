"""The load generator's pure parts: percentiles, the recorder, the schedule, the report."""

from __future__ import annotations

import math

import pytest

from diktyo.core.clock import ManualClock
from diktyo.load.client import Target, TargetError, parse_header, proxy_for
from diktyo.load.report import format_text, to_json
from diktyo.load.runner import LoadResult
from diktyo.load.schedule import Schedule
from diktyo.load.stats import ERROR_CODE, Recorder, percentile


def test_percentile_interpolates() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 75) == pytest.approx(3.25)
    assert percentile([7.0], 99.9) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_recorder_counts_codes_and_errors() -> None:
    rec = Recorder()
    for i in range(1, 101):
        rec.record(200 if i <= 90 else 503, i / 1000)
    rec.record_error("connection refused", 0.5)
    assert rec.count == 101
    assert rec.codes == {200: 90, 503: 10, ERROR_CODE: 1}
    assert rec.errors == {"connection refused": 1}
    s = rec.summary((50, 99.9))
    assert s.count == 101 and s.min == 0.001 and s.max == 0.5
    assert s.percentiles[0] == (50, pytest.approx(0.051))
    assert s.avg == pytest.approx((sum(range(1, 101)) / 1000 + 0.5) / 101)


def test_empty_summary_is_nan() -> None:
    s = Recorder().summary()
    assert s.count == 0 and math.isnan(s.avg) and all(math.isnan(v) for _, v in s.percentiles)


def test_schedule_by_count_unpaced() -> None:
    sched = Schedule(start=10.0, requests=3, duration=None)
    assert [sched.next(11.0) for _ in range(4)] == [11.0, 11.0, 11.0, None]


def test_schedule_paced_by_duration() -> None:
    clock = ManualClock(start=0.0)
    sched = Schedule(start=0.0, requests=None, duration=1.0, qps=4)
    slots = []
    while (due := sched.next(clock.monotonic())) is not None:
        slots.append(due)
        clock.now = due
    assert slots == [0.0, 0.25, 0.5, 0.75]  # the slot at 1.0 is past the end


def test_schedule_count_and_duration_whichever_first() -> None:
    sched = Schedule(start=0.0, requests=100, duration=2.0, qps=10)
    assert sum(1 for _ in iter(lambda: sched.next(0.0), None)) == 20
    sched = Schedule(start=0.0, requests=5, duration=2.0, qps=10)
    assert sum(1 for _ in iter(lambda: sched.next(0.0), None)) == 5
    sched = Schedule(start=0.0, requests=None, duration=2.0)
    assert sched.next(1.9) == 1.9 and sched.next(2.0) is None


def test_schedule_rejects_unbounded_and_negative() -> None:
    with pytest.raises(ValueError, match="request count or a duration"):
        Schedule(start=0.0, requests=None, duration=None)
    with pytest.raises(ValueError):
        Schedule(start=0.0, requests=1, duration=None, qps=-1)


def test_target_direct_and_through_proxy() -> None:
    direct = Target.build("http://httpbin:8000/status/503?x=1", headers=[("end-user", "jason")])
    assert (direct.connect_host, direct.connect_port, direct.proxy) == ("httpbin", 8000, None)
    assert direct.request.startswith(b"GET /status/503?x=1 HTTP/1.1\r\nHost: httpbin:8000\r\n")
    assert b"\r\nend-user: jason\r\n" in direct.request and direct.request.endswith(b"\r\n\r\n")
    env = {"HTTP_PROXY": "http://127.0.0.1:15001", "NO_PROXY": "localhost,127.0.0.1"}
    via = Target.build("http://httpbin:8000/get", env=env)
    assert (via.connect_host, via.connect_port) == ("127.0.0.1", 15001)
    assert via.request.startswith(b"GET http://httpbin:8000/get HTTP/1.1\r\n")
    local = Target.build("http://127.0.0.1:9/get", env=env)
    assert local.proxy is None and local.connect_port == 9
    assert Target.build("http://a/", headers=[("Host", "b")]).request.count(b"Host") == 1


def test_proxy_env_rules() -> None:
    assert proxy_for("x", {}) is None
    assert proxy_for("x", {"http_proxy": "http://l:1", "HTTP_PROXY": "http://u:2"}) == "http://l:1"
    assert proxy_for("reviews", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "reviews"}) is None


def test_bad_input_says_what_to_do() -> None:
    with pytest.raises(TargetError, match="not http://"):
        Target.build("https://x/")
    with pytest.raises(TargetError, match="no host"):
        Target.build("http:///x")
    with pytest.raises(TargetError, match="Name: value"):
        parse_header("no colon")
    assert parse_header("end-user:  jason ") == ("end-user", "jason")


def test_report_text_and_json() -> None:
    rec = Recorder()
    for _ in range(37):
        rec.record(200, 0.002)
    for _ in range(3):
        rec.record(503, 0.001)
    result = LoadResult(
        url="http://httpbin:8000/get",
        proxy=None,
        connections=2,
        requested_qps=0.0,
        elapsed=2.0,
        count=rec.count,
        codes=dict(sorted(rec.codes.items())),
        errors={},
        latency=rec.summary(),
        sockets=2,
    )
    text = format_text(result)
    assert "Code 200 : 37 (92.5 %)" in text
    assert "Code 503 : 3 (7.5 %)" in text
    assert "# target 99.9% 2.000 ms" in text
    assert "qps=20.0" in text
    data = to_json(result)
    assert data["codes"] == {"200": 37, "503": 3}
    assert data["latency_ms"]["percentiles"]["50"] == 2.0
    assert data["actual_qps"] == 20.0


def test_schedule_stop_ends_the_run() -> None:
    sched = Schedule(start=0.0, requests=None, duration=60.0, qps=10)
    assert sched.next(0.0) == 0.0 and sched.next(0.0) == 0.1
    sched.stop()
    assert sched.next(0.2) is None and sched.issued == 2


def test_split_requests_gives_each_connection_its_share_like_fortio() -> None:
    from diktyo.load.schedule import split_requests

    assert split_requests(20, 2) == [10, 10]
    assert split_requests(30, 3) == [10, 10, 10]
    assert split_requests(7, 3) == [3, 2, 2]
    assert split_requests(2, 4) == [1, 1, 0, 0]
    assert split_requests(None, 2) == [None, None]
    with pytest.raises(ValueError, match="connections"):
        split_requests(10, 0)

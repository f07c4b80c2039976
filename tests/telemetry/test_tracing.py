"""Trace propagation: W3C and B3 in, both out; sampling decisions honoured."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diktyo.core.clock import ManualClock, make_random
from diktyo.telemetry.tracing import (
    Sampler,
    extract,
    inject,
    sampling_only,
    span_name,
    start_span,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


def test_traceparent_extract_and_child() -> None:
    h = {
        "traceparent": f"00-{TID}-{SID}-01",
        "tracestate": "congo=t61rcWkgMzE",
        "x-request-id": "r1",
    }
    ctx = extract(h)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.tracestate) == (
        TID,
        SID,
        True,
        "congo=t61rcWkgMzE",
    )
    span = start_span(ctx, "reviews:9080/*", "client", Sampler(0.0), make_random(1), ManualClock())
    assert span.sampled is True  # the incoming decision wins over a 0 % sampler
    assert span.trace_id == TID and span.parent_id == SID and span.span_id != SID
    out = dict(inject(span))
    assert out["traceparent"] == f"00-{TID}-{span.span_id}-01"
    assert out["tracestate"] == "congo=t61rcWkgMzE"
    assert out["x-b3-traceid"] == TID and out["x-b3-spanid"] == span.span_id
    assert out["x-b3-parentspanid"] == SID and out["x-b3-sampled"] == "1"
    assert out["x-request-id"] == "r1"


def test_unsampled_traceparent_is_honoured() -> None:
    ctx = extract({"traceparent": f"00-{TID}-{SID}-00"})
    span = start_span(ctx, "x", "server", Sampler(100.0), make_random(1), ManualClock())
    assert span.sampled is False
    assert dict(inject(span))["x-b3-sampled"] == "0"


def test_b3_multi_with_64bit_trace_id() -> None:
    ctx = extract({"x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": SID, "x-b3-sampled": "0",
                   "x-b3-parentspanid": "1111111111111111"})  # fmt: skip
    assert ctx is not None
    assert ctx.trace_id == "0000000000000000a3ce929d0e0e4736"
    assert ctx.sampled is False and ctx.parent_span_id == "1111111111111111"


def test_b3_debug_flag_samples() -> None:
    ctx = extract({"x-b3-traceid": TID, "x-b3-spanid": SID, "x-b3-flags": "1"})
    assert ctx is not None and ctx.sampled is True


def test_b3_single() -> None:
    ctx = extract({"b3": f"{TID}-{SID}-1-1111111111111111"})
    assert ctx is not None and ctx.sampled is True and ctx.parent_span_id == "1111111111111111"
    ctx = extract({"b3": f"{TID}-{SID}"})
    assert ctx is not None and ctx.sampled is None
    assert extract({"b3": "0"}) is None
    assert sampling_only({"b3": "0"}) is False


def test_traceparent_wins_over_b3() -> None:
    ctx = extract(
        {"traceparent": f"00-{TID}-{SID}-01", "x-b3-traceid": "1" * 32, "x-b3-spanid": "2" * 16}
    )
    assert ctx is not None and ctx.trace_id == TID


@pytest.mark.parametrize(
    "value",
    [
        f"00-{'0' * 32}-{SID}-01",  # zero trace id
        f"00-{TID}-{'0' * 16}-01",  # zero span id
        f"ff-{TID}-{SID}-01",  # forbidden version
        f"00-{TID}-{SID}-01-extra",  # version 00 has no more fields
        f"00-{TID.upper()}x-{SID}-01",
        "garbage",
    ],
)
def test_bad_traceparent_falls_back_to_b3_or_none(value: str) -> None:
    assert extract({"traceparent": value}) is None
    ctx = extract({"traceparent": value, "x-b3-traceid": TID, "x-b3-spanid": SID})
    assert ctx is not None and ctx.span_id == SID


def test_future_traceparent_version_is_accepted() -> None:
    ctx = extract({"traceparent": f"01-{TID}-{SID}-01-whatever"})
    assert ctx is not None and ctx.trace_id == TID


def test_new_trace_gets_request_id_and_sampler_percent() -> None:
    rng = make_random(7)
    clock = ManualClock()
    sampler = Sampler(10.0)
    spans = [start_span(None, "x", "server", sampler, rng, clock) for _ in range(2000)]
    rate = sum(s.sampled for s in spans) / len(spans)
    assert 0.07 < rate < 0.13
    assert all(s.parent_id is None and len(s.trace_id) == 32 for s in spans)
    assert len({s.trace_id for s in spans}) == 2000
    assert spans[0].request_id.count("-") == 4
    assert "x-b3-parentspanid" not in dict(inject(spans[0]))


def test_sampler_bounds() -> None:
    with pytest.raises(ValueError, match="0..100"):
        Sampler(101)


def test_finish_sets_status_and_duration() -> None:
    clock = ManualClock()
    span = start_span(None, span_name("reviews.default.svc.cluster.local", 9080), "client",
                      Sampler(100), make_random(1), clock)  # fmt: skip
    clock.advance(0.25)
    span.finish(clock, 503, "UO")
    assert span.status == "error" and "UO" in span.status_message
    assert span.duration_ms == pytest.approx(250.0)
    assert span.name == "reviews.default.svc.cluster.local:9080/*"
    ok = start_span(None, "x", "server", Sampler(100), make_random(2), clock)
    ok.finish(clock, 200)
    assert ok.status == "ok"


@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate", "b3", "x-b3-traceid",
                                        "x-b3-spanid", "x-b3-sampled", "x-b3-flags",
                                        "x-b3-parentspanid", "x-request-id"]),
                       st.text(max_size=80)))  # fmt: skip
@settings(deadline=None)
def test_extract_never_raises(headers: dict[str, str]) -> None:
    ctx = extract(headers)
    if ctx is not None:
        assert len(ctx.trace_id) == 32 and len(ctx.span_id) == 16
        span = start_span(ctx, "x", "server", Sampler(1), make_random(0), ManualClock())
        round_trip = extract(dict(inject(span)))
        assert round_trip is not None and round_trip.trace_id == ctx.trace_id


def test_unsafe_request_id_and_tracestate_are_not_forwarded() -> None:
    ctx = extract({"traceparent": f"00-{TID}-{SID}-01", "tracestate": "a=b\r\nx: y",
                   "x-request-id": "id\r\nSet-Cookie: x"})  # fmt: skip
    assert ctx is not None and ctx.tracestate == "" and ctx.request_id == ""
    span = start_span(ctx, "x", "server", Sampler(1), make_random(0), ManualClock())
    assert all("\n" not in v and "\r" not in v for _, v in inject(span))

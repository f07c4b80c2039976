"""The embedded store: text parser, edge ring with rates and quantiles, SQLite trace store."""

from __future__ import annotations

import math

import pytest

from diktyo.core.clock import ManualClock, make_random
from diktyo.telemetry.exposition import render
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.otlp import encode_spans
from diktyo.telemetry.promtext import parse
from diktyo.telemetry.store import MetricStore, TraceStore, histogram_quantile
from diktyo.telemetry.tracing import Sampler, start_span

PP = WorkloadInfo.from_labels("productpage-v1", "default", {"app": "productpage", "version": "v1"})
RV2 = WorkloadInfo.from_labels("reviews-v2", "default", {"app": "reviews", "version": "v2"})
HOST = "reviews.default.svc.cluster.local"


def test_parser_handles_escapes_inf_and_bad_lines() -> None:
    text = (
        "# HELP x a\n# TYPE x counter\n"
        'x{a="q\\"u\\\\o\\nte",b="2"} 3\n'
        "y 1.5e3\n"
        'h_bucket{le="+Inf"} +Inf\n'
        "broken{a=\n"
        "novalue\n"
    )
    res = parse(text)
    assert res.types == {"x": "counter"}
    assert res.samples[0].labels == {"a": 'q"u\\o\nte', "b": "2"}
    assert res.samples[1].value == 1500.0
    assert math.isinf(res.samples[2].value)
    assert res.bad_lines == 2


def test_parser_reads_our_exposition() -> None:
    m = IstioMetrics()
    k = m.peer(PeerLabels(source_workload='a"b'))
    m.record(k, 200, "-", 3.0, 1, 2)
    res = parse(render(m))
    assert res.bad_lines == 0
    tot = [s for s in res.samples if s.name == "istio_requests_total"]
    assert tot[0].labels["source_workload"] == 'a"b' and tot[0].value == 1


def test_histogram_quantile_like_prometheus() -> None:
    b = {1.0: 0.0, 5.0: 50.0, 10.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, b) == pytest.approx(5.0)
    assert histogram_quantile(0.25, b) == pytest.approx(3.0)
    assert histogram_quantile(0.99, b) == pytest.approx(9.9)
    assert histogram_quantile(0.99, {1.0: 1, math.inf: 100}) == 1.0  # lands in +Inf: last bound
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0, math.inf: 0}) is None


def scrape(store: MetricStore, m: IstioMetrics, t: float, instance: str = "pp-1") -> None:
    store.ingest(instance, render(m), t)


def test_edge_rate_error_rate_and_latency() -> None:
    clock = ManualClock(wall=1_700_000_000.0, start=0)
    store = MetricStore(resolution=5, retention=60, clock=clock)
    m = IstioMetrics()
    src = m.peer(PeerLabels.build("source", PP, RV2, HOST))
    scrape(store, m, clock.time())  # first scrape: baseline, no rate
    for _i in range(90):
        m.record(src, 200, "-", 20.0, 0, 100)
    for _i in range(10):
        m.record(src, 503, "UO", 1.0, 0, 0)
    clock.advance(5)
    scrape(store, m, clock.time())
    g = store.graph(window=10)
    (edge,) = g["edges"]
    assert edge["sourceWorkload"] == "productpage-v1" and edge["destinationVersion"] == "v2"
    assert edge["requests"] == 100
    assert edge["rps"] == pytest.approx(10.0)  # 100 requests over a 10 s window
    assert edge["errorRate"] == pytest.approx(0.10)
    assert edge["codes"] == {"2xx": 90, "5xx": 10}
    assert 10 < edge["p50"] <= 25 and 10 < edge["p99"] <= 25
    assert {n["id"] for n in g["nodes"]} == {"default/productpage-v1", HOST}


def test_counter_reset_and_new_series_after_first_scrape() -> None:
    clock = ManualClock(wall=1_700_000_000.0, start=0)
    store = MetricStore(resolution=5, retention=60, clock=clock)
    m = IstioMetrics()
    k = m.peer(PeerLabels.build("destination", PP, RV2, HOST))
    for _ in range(5):
        m.record(k, 200, "-", 1.0, 0, 0)
    scrape(store, m, clock.time())
    clock.advance(5)
    m.record(k, 500, "-", 1.0, 0, 0)  # new series appears between scrapes
    scrape(store, m, clock.time())
    m2 = IstioMetrics()  # the sidecar restarted: counters start over
    k2 = m2.peer(PeerLabels.build("destination", PP, RV2, HOST))
    for _ in range(3):
        m2.record(k2, 200, "-", 1.0, 0, 0)
    clock.advance(5)
    scrape(store, m2, clock.time())
    pts = store.series({"destination_service": HOST}, window=15)
    assert [p["requests"] for p in pts] == [0, 1, 3]
    assert pts[1]["errorRate"] == 1.0


def test_ring_is_bounded() -> None:
    clock = ManualClock(wall=1_700_000_000.0, start=0)
    store = MetricStore(resolution=5, retention=30, clock=clock)
    m = IstioMetrics()
    k = m.peer(PeerLabels.build("source", PP, RV2, HOST))
    for _ in range(40):
        m.record(k, 200, "-", 1.0, 0, 0)
        scrape(store, m, clock.time())
        clock.advance(5)
    assert len(store._ring) <= 6
    with pytest.raises(ValueError, match="unknown filter"):
        store.series({"nope": "x"})


def test_source_reporter_preferred_in_graph() -> None:
    clock = ManualClock(wall=1_700_000_000.0, start=0)
    store = MetricStore(resolution=5, retention=60, clock=clock)
    client, server = IstioMetrics(), IstioMetrics()
    ks = client.peer(PeerLabels.build("source", PP, RV2, HOST))
    kd = server.peer(PeerLabels.build("destination", PP, RV2, HOST, mtls=True))
    scrape(store, client, clock.time(), "pp")
    scrape(store, server, clock.time(), "rv")
    for _ in range(4):
        client.record(ks, 200, "-", 1.0, 0, 0)
        server.record(kd, 200, "-", 1.0, 0, 0)
    clock.advance(5)
    scrape(store, client, clock.time(), "pp")
    scrape(store, server, clock.time(), "rv")
    (edge,) = store.graph(window=5)["edges"]
    assert edge["reporter"] == "source" and edge["requests"] == 4  # not 8


def make_spans(n_traces: int, clock: ManualClock, error_every: int = 0) -> bytes:
    rng = make_random(11)
    spans = []
    for i in range(n_traces):
        root = start_span(None, "productpage:9080/*", "server", Sampler(100), rng, clock)
        child = start_span(root.context, "reviews:9080/*", "client", Sampler(100), rng, clock)
        clock.advance(0.001 * (i + 1))
        child.finish(clock, 503 if error_every and i % error_every == 0 else 200)
        root.finish(clock, 200)
        spans += [root, child]
    return encode_spans(spans, "productpage.default")


def test_trace_store_filters_and_get() -> None:
    ts = TraceStore()
    clock = ManualClock()
    assert ts.ingest_otlp(make_spans(10, clock, error_every=5)) == 20
    all_traces = ts.list_traces()
    assert len(all_traces) == 10 and all_traces[0]["startNs"] >= all_traces[-1]["startNs"]
    assert all(t["spanCount"] == 2 for t in all_traces)
    assert all(t["rootName"] == "productpage:9080/*" for t in all_traces)
    assert len(ts.list_traces(errors_only=True)) == 2
    slow = ts.list_traces(min_duration_ms=8.0)
    assert len(slow) == 3 and all(t["durationMs"] >= 8.0 for t in slow)
    assert ts.list_traces(service="productpage.default", limit=3)[0]["services"] == [
        "productpage.default"
    ]
    assert ts.list_traces(service="reviews") == []
    spans = ts.get_trace(all_traces[0]["traceId"])
    assert len(spans) == 2
    root = next(s for s in spans if s["parentId"] is None)
    child = next(s for s in spans if s["parentId"] is not None)
    assert child["parentId"] == root["spanId"] and child["kind"] == "client"
    assert ts.get_trace("0" * 32) == []


def test_trace_store_is_bounded_and_idempotent() -> None:
    ts = TraceStore(max_spans=50)
    clock = ManualClock()
    body = make_spans(40, clock)
    ts.ingest_otlp(body)
    assert ts.span_count() <= 50
    assert ts.evicted_traces >= 15
    before = ts.span_count()
    ts.ingest_otlp(make_spans(1, ManualClock()))  # same ids again (same seed): ignored
    assert ts.span_count() <= 50 and ts.span_count() >= before - 2

"""The control plane's telemetry API on a real aiohttp server: OTLP in, graph/series/traces out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from diktyo.core.clock import ManualClock, make_random
from diktyo.proxy.stats import Stats
from diktyo.telemetry.exposition import CONTENT_TYPE, render
from diktyo.telemetry.http import setup_routes
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.otlp import OtlpExporter
from diktyo.telemetry.scrape import Scraper
from diktyo.telemetry.store import MetricStore, TraceStore
from diktyo.telemetry.tracing import Sampler, start_span
from diktyo.testing import eventually


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, MetricStore, TraceStore, ManualClock]]:
    clock = ManualClock(wall=1_700_000_000.0, start=0)
    metrics = MetricStore(resolution=5, retention=300, clock=clock)
    traces = TraceStore()
    app = web.Application()
    setup_routes(app, metrics, traces)
    runner, base = await serve(app)
    yield base, metrics, traces, clock
    await runner.cleanup()
    traces.close()


async def test_otlp_receiver_and_trace_queries(api: tuple) -> None:
    base, _, traces, _ = api
    clock = ManualClock()
    rng = make_random(5)
    exp = OtlpExporter(f"{base}/v1/traces", batch_size=4, flush_interval=0.05,
                       service_name="productpage.default")  # fmt: skip
    async with exp:
        for i in range(3):
            root = start_span(None, "productpage:9080/*", "server", Sampler(100), rng, clock)
            child = start_span(root.context, "reviews:9080/*", "client", Sampler(100), rng, clock)
            clock.advance(0.002)
            child.finish(clock, 500 if i == 0 else 200)
            root.finish(clock, 200)
            exp.export(child)
            exp.export(root)
    assert exp.exported == 6 and exp.failed == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/traces") as r:
            listed = (await r.json())["traces"]
        assert len(listed) == 3
        async with http.get(f"{base}/api/traces", params={"errors": "1"}) as r:
            errs = (await r.json())["traces"]
        assert len(errs) == 1
        async with http.get(f"{base}/api/traces/{errs[0]['traceId']}") as r:
            body = await r.json()
        assert len(body["spans"]) == 2
        assert {s["kind"] for s in body["spans"]} == {"server", "client"}
        async with http.get(f"{base}/api/traces/{'f' * 32}") as r:
            assert r.status == 404
        async with http.get(f"{base}/api/traces", params={"minDurationMs": "abc"}) as r:
            assert r.status == 400 and "must be a number" in (await r.json())["error"]
        async with http.post(f"{base}/v1/traces", data=b"{}",
                             headers={"Content-Type": "application/json"}) as r:  # fmt: skip
            assert r.status == 415
        async with http.post(f"{base}/v1/traces", data=b"\xff\xfe garbage",
                             headers={"Content-Type": "application/x-protobuf"}) as r:  # fmt: skip
            assert r.status == 400
    assert traces.span_count() == 6


async def test_scraper_fills_graph_and_series(api: tuple) -> None:
    base, metrics, _, clock = api
    m = IstioMetrics()
    pp = WorkloadInfo.from_labels(
        "productpage-v1", "default", {"app": "productpage", "version": "v1"}
    )
    rv = WorkloadInfo.from_labels("reviews-v3", "default", {"app": "reviews", "version": "v3"})
    key = m.peer(PeerLabels.build("destination", pp, rv, "reviews.default.svc.cluster.local"))

    proxy_stats = Stats()
    proxy_stats.inc_cluster("inbound|9080||", "upstream_rq_pending_overflow", 2)

    async def stats(_: web.Request) -> web.Response:
        return web.Response(text=render(m, proxy_stats), headers={"Content-Type": CONTENT_TYPE})

    sidecar = web.Application()
    sidecar.router.add_get("/stats/prometheus", stats)
    runner, sbase = await serve(sidecar)
    scraper = Scraper(metrics, lambda: [("reviews-v3-1", f"{sbase}/stats/prometheus"),
                                        ("gone", "http://127.0.0.1:9/stats/prometheus")],
                      clock=clock, timeout=2)  # fmt: skip
    try:
        assert await scraper.scrape_once() == 1
        assert scraper.failures == 1
        for _ in range(20):
            m.record(key, 200, "-", 40.0, 0, 10)
        m.record(key, 503, "UF", 1.0, 0, 0)
        clock.advance(5)
        assert await scraper.scrape_once() == 1
    finally:
        await scraper.close()
        await runner.cleanup()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/metrics/graph", params={"window": "10"}) as r:
            g = await r.json()
        (edge,) = g["edges"]
        assert edge["requests"] == 21 and edge["destinationVersion"] == "v3"
        assert edge["errorRate"] == pytest.approx(1 / 21)
        assert 25 < edge["p95"] <= 50
        params = {"window": "10", "destination_workload": "reviews-v3"}
        async with http.get(f"{base}/api/metrics/series", params=params) as r:
            s = await r.json()
        assert [p["requests"] for p in s["points"]] == [0, 21]
        async with http.get(f"{base}/api/metrics/series", params={"bogus": "1"}) as r:
            assert r.status == 400
        async with http.get(f"{base}/api/metrics/clusters") as r:
            cl = (await r.json())["instances"]
        assert cl["reviews-v3-1"]["inbound|9080||"]["upstream_rq_pending_overflow"] == 2


async def test_scraper_task_is_owned() -> None:
    scraper = Scraper(MetricStore(), list, interval=0.01)
    scraper.start()
    await eventually(lambda: scraper.rounds >= 1, timeout=10, what="a scrape round")
    await scraper.close()
    assert not any(t.get_name() == "telemetry-scraper" for t in asyncio.all_tasks())


async def test_scraper_refuses_an_oversized_exposition(monkeypatch: pytest.MonkeyPatch) -> None:
    from diktyo.telemetry import scrape

    monkeypatch.setattr(scrape, "MAX_BODY", 1000)

    async def big(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await resp.prepare(req)
        for _ in range(10):
            await resp.write(b"# " + b"x" * 497 + b"\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stats/prometheus", big)
    runner, base = await serve(app)
    store = MetricStore()
    scraper = Scraper(store, lambda: [("big", f"{base}/stats/prometheus")], timeout=5)
    try:
        assert await scraper.scrape_once() == 0
        assert scraper.failures == 1
    finally:
        await scraper.close()
        await runner.cleanup()

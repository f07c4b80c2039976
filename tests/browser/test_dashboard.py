"""The dashboard in real headless Chromium (Debian's, driven by Playwright), fed by the real
telemetry library: Istio metrics recorded and scraped as Prometheus text into the embedded
store, spans encoded as OTLP protobuf into the trace store. Screenshots land in
``test-artifacts/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from aiohttp import web

from diktyo.core.clock import ManualClock, make_random
from diktyo.dashboard.backend import MeshBackend
from diktyo.dashboard.server import setup_dashboard
from diktyo.telemetry.exposition import render
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.otlp import encode_spans
from diktyo.telemetry.store import MetricStore, TraceStore
from diktyo.telemetry.tracing import Sampler, start_span

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)"
)
playwright = pytest.importorskip("playwright.async_api")

SVC = "{}.default.svc.cluster.local"


def wl(name: str, app: str, version: str) -> WorkloadInfo:
    return WorkloadInfo.from_labels(name, "default", {"app": app, "version": version})


def bookinfo_store(clock: ManualClock) -> MetricStore:
    """Two scrapes of a productpage sidecar that called details and reviews v1/v2."""
    m = IstioMetrics()
    pp = wl("productpage-v1", "productpage", "v1")
    edges = {
        "details": (wl("details-v1", "details", "v1"), 200),
        "reviews-v1": (wl("reviews-v1", "reviews", "v1"), 200),
        "reviews-v2": (wl("reviews-v2", "reviews", "v2"), 503),
    }
    keys = {
        name: m.peer(PeerLabels.build("source", pp, dst, SVC.format(dst.app)))
        for name, (dst, _) in edges.items()
    }
    store = MetricStore(resolution=5.0, retention=3600.0, clock=clock)
    store.ingest("productpage-v1-1", render(m))
    for _ in range(12):
        for name, (_, code) in edges.items():
            for _ in range(10):
                m.record(keys[name], code if name != "reviews-v2" else 200, "-", 12.0, 0, 500)
            if name == "reviews-v2":
                m.record(keys[name], 503, "UO", 1.0, 0, 20)
        clock.advance(5.0)
        store.ingest("productpage-v1-1", render(m))
    return store


def one_trace(clock: ManualClock) -> tuple[TraceStore, str]:
    rng, sampler = make_random(7), Sampler(100.0)
    root = start_span(None, "productpage.default.svc.cluster.local:9080/*", "server", sampler, rng, clock)
    child = start_span(root.context, "reviews.default.svc.cluster.local:9080/*", "client", sampler, rng, clock)
    clock.advance(0.03)
    child.finish(clock, 200)
    clock.advance(0.01)
    root.finish(clock, 200)
    traces = TraceStore()
    traces.ingest_otlp(encode_spans([root], "productpage-v1.default"))
    traces.ingest_otlp(encode_spans([child], "productpage-v1.default"))
    return traces, root.trace_id


@pytest.fixture
async def dashboard_url():
    clock = ManualClock(start=0.0, wall=1_800_000_000.0)
    store = bookinfo_store(clock)
    traces, trace_id = one_trace(clock)
    config = {
        "resources": [
            {"kind": "VirtualService", "name": "reviews", "namespace": "default",
             "file": "vs.yaml", "line": 1, "end_line": 20},
        ],
        "messages": [
            {"file": "vs.yaml", "line": 9, "column": 7, "severity": "warning",
             "message": "subset v9 is not defined in any DestinationRule for reviews"},
        ],
        "control_plane": {"backend": "etcd", "replica": "r1", "leader": "r0", "replicas": [
            {"id": "r0", "url": "http://127.0.0.1:1", "leader": True},
            {"id": "r1", "url": "http://127.0.0.1:2", "leader": False}]},
    }
    resilience = [{
        "workload": "productpage-v1", "cluster": "outbound|9080|v2|reviews.default.svc.cluster.local",
        "breaker": {"connections": 1, "max_connections": 1, "pending": 0, "max_pending": 1,
                    "requests": 1, "max_requests": 4294967295, "retries": 0, "max_retries": 3},
        "overflows": {"upstream_rq_pending_overflow": 3},
        "hosts": [{"address": "127.0.0.1:5001", "ejected": True, "active": 0}],
    }]  # fmt: skip
    backend = MeshBackend(store, traces, config=lambda: config, resilience=lambda: resilience)
    # the stores answer "now" from the manual clock, the same one that took the scrapes
    app = web.Application()
    setup_dashboard(app, backend)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/", trace_id
    await runner.cleanup()


async def test_graph_metrics_traces_resilience_config(dashboard_url) -> None:
    url, trace_id = dashboard_url
    ARTIFACTS.mkdir(exist_ok=True)
    async with playwright.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(url + "?window=3600#graph")
        await page.select_option("#graph-window", "900")
        await page.wait_for_function("document.querySelector('#graph').dataset.edges === '3'")
        nodes = await page.evaluate("state.cy.nodes().map(n => n.id()).sort()")
        assert "default/productpage-v1" in nodes
        assert {"default/details-v1", "default/reviews-v1", "default/reviews-v2"} <= set(nodes)
        assert "app:reviews" in nodes  # versioned-app view groups versions under their app
        edge_colors = await page.evaluate(
            "Object.fromEntries(state.cy.edges().map(e => [e.target().id(), e.data('color')]))"
        )
        assert edge_colors["default/reviews-v2"] == "#f59e0b"  # 1 of 11 failed: > 1 % errors
        assert edge_colors["default/details-v1"] == "#22c55e"
        await page.screenshot(path=str(ARTIFACTS / "dashboard-graph.png"))

        # an edge's own charts: select the edge, then "Charts for this edge"
        await page.evaluate(
            "state.selected = 'default/productpage-v1->default/reviews-v2'; showSelection()"
        )
        await page.click("#edge-charts")
        await page.wait_for_function("Number(document.querySelector('#tab-metrics').dataset.points) > 0")
        edge_text = await page.inner_text("#metrics-edge")
        assert "productpage-v1 → reviews.default.svc.cluster.local" in edge_text
        assert await page.locator("#chart-success canvas").count() == 1
        await page.screenshot(path=str(ARTIFACTS / "dashboard-edge.png"))
        await page.click("#metrics-edge button")  # back to the whole service

        await page.click("a[data-tab=metrics]")
        await page.wait_for_function("Number(document.querySelector('#tab-metrics').dataset.points) > 0")
        assert await page.locator("#chart-rps canvas").count() == 1
        assert await page.locator("#chart-latency canvas").count() == 1
        await page.screenshot(path=str(ARTIFACTS / "dashboard-metrics.png"))

        await page.click("a[data-tab=traces]")
        row = page.locator(f"tr[data-trace='{trace_id}']")
        await row.wait_for()
        await row.click()
        await page.locator("#trace-view .row.span").nth(1).wait_for()
        assert await page.locator("#trace-view .row.span").count() == 2
        await page.screenshot(path=str(ARTIFACTS / "dashboard-trace.png"))

        await page.click("a[data-tab=resilience]")
        await page.locator(".resilience-card").wait_for()
        text = await page.inner_text("#resilience")
        assert "1 / 1" in text and "upstream_rq_pending_overflow=3" in text and "ejected" in text

        await page.click("a[data-tab=config]")
        await page.locator("#config-table tbody tr").wait_for()
        assert "subset v9 is not defined" in await page.inner_text("#config-table")
        replicas = await page.inner_text("#config-replicas")  # replicas and leader (etcd store)
        assert "etcd store · replicas: r0 (leader), r1 · this page from r1" in replicas, replicas
        await page.screenshot(path=str(ARTIFACTS / "dashboard-config.png"))
        assert errors == []
        await browser.close()


async def test_edge_series_is_what_the_caller_saw() -> None:
    clock = ManualClock(start=0.0, wall=1_800_000_000.0)
    backend = MeshBackend(bookinfo_store(clock), TraceStore())
    svc = SVC.format("reviews")
    edge = await backend.series(svc, 900.0, source="productpage-v1")
    whole = await backend.series(svc, 900.0)
    # productpage-v1 made 10 good + 1 UO call to reviews-v2 and 10 to reviews-v1 per scrape:
    # the edge (caller's view) has them all, 1 of 21 failing per slot
    ok = [r for r in edge["success_rate"] if r is not None]
    assert ok and all(abs(r - 20 / 21) < 1e-9 for r in ok)
    assert sum(x for x in edge["rps"] if x) > 0
    assert whole["t"] == edge["t"]
    nobody = await backend.series(svc, 900.0, source="nobody")
    assert nobody["rps"] == [0.0] * len(edge["t"])

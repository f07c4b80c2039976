"""PrometheusSource answers MetricStore's graph/series from a REAL Prometheus scraping Istio metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from diktyo.core.clock import ManualClock
from diktyo.dashboard.backend import MeshBackend
from diktyo.security import admin_token
from diktyo.telemetry.exposition import CONTENT_TYPE, render
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.prometheus_config import scrape_config
from diktyo.telemetry.prometheus_source import (
    PrometheusError,
    PrometheusSource,
    fold_graph,
    graph_queries,
    promql_string,
    selector,
    series_queries,
)
from diktyo.telemetry.store import MetricStore, TraceStore
from diktyo.testing import eventually, free_port

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
REVIEWS = "reviews.default.svc.cluster.local"


# ----------------------------------------------------------------------------- pure parts


def test_promql_strings_are_escaped() -> None:
    assert promql_string('a"b\\c') == '"a\\"b\\\\c"'
    assert selector({}) == ""
    assert selector({"b": "2", "a": "1"}) == '{a="1",b="2"}'


def test_series_rejects_unknown_filters() -> None:
    with pytest.raises(ValueError, match="unknown filter 'pod'"):
        series_queries({"pod": "x"}, "destination", 60)
    q = series_queries({"destination_service": REVIEWS}, "destination", 60)
    assert f'destination_service="{REVIEWS}"' in q["p99"] and "histogram_quantile(0.99" in q["p99"]


def test_fold_graph_prefers_source_reporter_and_counts_errors() -> None:
    def row(reporter: str, code: str, v: float) -> dict[str, Any]:
        return {"metric": {"reporter": reporter, "source_workload": "pp",
                           "source_workload_namespace": "default", "source_version": "v1",
                           "destination_service": REVIEWS, "destination_workload": "reviews-v1",
                           "destination_version": "v1", "response_code": code},
                "value": [0, str(v)]}  # fmt: skip

    g = fold_graph(
        60,
        {"requests": [row("source", "200", 50), row("source", "503", 10),
                      row("destination", "200", 999)],
         "p50": [{**row("source", "", 0), "value": [0, "17.5"]}],
         "p99": [{**row("source", "", 0), "value": [0, "NaN"]}]},
    )  # fmt: skip
    (edge,) = g["edges"]
    assert edge["reporter"] == "source" and edge["requests"] == 60
    assert edge["rps"] == 1.0 and abs(edge["errorRate"] - 1 / 6) < 1e-9
    assert edge["codes"] == {"2xx": 50, "5xx": 10}
    assert edge["p50"] == 17.5 and edge["p99"] is None


async def test_unreachable_prometheus_degrades_to_empty_answers() -> None:
    port = free_port()  # nothing listens there
    clock = ManualClock()
    src = PrometheusSource(f"http://127.0.0.1:{port}", timeout=0.5, backoff=5.0, clock=clock)
    assert (await src.graph(60))["edges"] == []
    assert src.failures == 1 and "cannot reach Prometheus" in src.last_error
    # backing off: answered empty without asking
    points = await src.series({"destination_service": REVIEWS}, 60)
    assert points and all(p["requests"] == 0 and p["p50"] is None for p in points)
    assert src.failures == 1 and src.skipped == 1
    asked = src.queries
    assert asked >= 1
    clock.advance(5.0)
    assert await src.series({"destination_service": REVIEWS}, 60)
    assert src.failures == 2 and src.skipped == 1 and src.queries > asked
    with pytest.raises(PrometheusError):
        await src.query("up")
    with pytest.raises(ValueError, match="http://"):
        PrometheusSource("127.0.0.1:9090")


# ----------------------------------------------------------------------------- real Prometheus


class Sidecars:
    """Recorded Istio metrics of productpage -> reviews, served as a sidecar would."""

    def __init__(self) -> None:
        self.m = IstioMetrics()
        pp = WorkloadInfo.from_labels(
            "productpage-v1", "default", {"app": "productpage", "version": "v1"}
        )
        rv = WorkloadInfo.from_labels("reviews-v1", "default", {"app": "reviews", "version": "v1"})
        self.src = self.m.peer(PeerLabels.build("source", pp, rv, REVIEWS))
        self.dst = self.m.peer(PeerLabels.build("destination", pp, rv, REVIEWS))

    def traffic(self, ok: int, failed: int) -> None:
        for key in (self.src, self.dst):
            for _ in range(ok):
                self.m.record(key, 200, "-", 12.0, 0, 100)
            for _ in range(failed):
                self.m.record(key, 503, "UO", 12.0, 0, 0)

    def text(self) -> str:
        return render(self.m)


@contextlib.asynccontextmanager
async def serve(sidecars: Sidecars) -> AsyncIterator[int]:
    async def stats(_: web.Request) -> web.Response:
        return web.Response(text=sidecars.text(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/stats/prometheus", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target_port: int) -> AsyncIterator[str]:
    assert PROMETHEUS is not None
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(scrape_config([f"127.0.0.1:{target_port}"], scrape_interval="1s"))
    pport = free_port()
    log_path = tmp_path / "prometheus.log"
    log = log_path.open("w")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{pport}", stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{pport}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def wait_total(src: PrometheusSource, expected: float, deadline: float) -> None:
    """Until Prometheus has scraped ``expected`` source-reported requests (cache bypassed)."""
    last: list[Any] = [None]

    async def seen() -> bool:
        res = last[0] = await src.query(
            'sum(istio_requests_total{reporter="source"})', time.time()
        )
        return bool(res) and float(res[0]["value"][1]) == expected

    await eventually(
        seen,
        timeout=max(0.0, deadline - time.monotonic()),
        interval=0.3,
        ignore=(PrometheusError,),
        what=lambda: f"Prometheus seeing {expected} source-reported requests ({last[0]!r})",
    )


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)
async def test_graph_and_series_from_real_prometheus(tmp_path: Path) -> None:
    sidecars = Sidecars()
    # both series exist from the first scrape on, with values far enough from zero that
    # increase() extrapolates both alike (Prometheus limits extrapolation at a zero crossing)
    sidecars.traffic(ok=100, failed=100)
    async with serve(sidecars) as port, prometheus(tmp_path, port) as url:
        src = PrometheusSource(url, step=1.0, rate_window=30.0, cache_ttl=0.0)
        deadline = time.monotonic() + 40
        await wait_total(src, 200.0, deadline)
        sidecars.traffic(ok=50, failed=10)
        await wait_total(src, 260.0, deadline)
        await asyncio.sleep(2.5)  # real time: a few more scrapes: rate() needs two samples before a point

        graph = await src.graph(30.0)
        (edge,) = graph["edges"]
        assert edge["reporter"] == "source"  # destination-reported twin is merged away
        assert edge["sourceWorkload"] == "productpage-v1" and edge["destinationService"] == REVIEWS
        assert edge["destinationWorkload"] == "reviews-v1" and edge["destinationVersion"] == "v1"
        assert edge["requests"] > 0 and edge["rps"] > 0
        assert abs(edge["errorRate"] - 10 / 60) < 1e-6, edge  # same extrapolation on both codes
        assert set(edge["codes"]) == {"2xx", "5xx"}
        # all durations 12 ms -> in the (10, 25] bucket: histogram_quantile interpolates there
        assert edge["p50"] == pytest.approx(17.5) and edge["p99"] == pytest.approx(24.85)
        assert edge["meanMs"] == pytest.approx(12.0)
        assert {n["id"] for n in graph["nodes"]} == {"default/productpage-v1", REVIEWS}

        # the same exposition through the embedded store gives the same keys (same shapes)
        clock = ManualClock(start=0.0, wall=time.time())
        store = MetricStore(clock=clock)
        store.ingest("pp", Sidecars().text())
        clock.advance(5.0)
        store.ingest("pp", sidecars.text())
        ref = store.graph(30.0)
        assert set(ref) == set(graph) and set(ref["edges"][0]) == set(edge)
        assert set(ref["nodes"][0]) == set(graph["nodes"][0])

        points = await src.series({"destination_service": REVIEWS}, 20.0)
        assert len(points) == 20 and set(points[0]) == set(store.series({}, 20.0)[0])
        busy = [p for p in points if p["requests"] > 0]
        assert busy, points
        assert all(abs(p["errorRate"] - 10 / 60) < 0.05 for p in busy[-3:]), busy[-3:]
        assert busy[-1]["p50"] == pytest.approx(17.5)
        assert all(p["t"] % 1.0 == 0 for p in points)
        none = await src.series({"destination_workload": "nobody"}, 10.0)
        assert all(p["requests"] == 0 and p["p99"] is None for p in none)

        # MeshBackend works unchanged on top of it: the dashboard's graph and charts
        backend = MeshBackend(src, TraceStore())
        dg = await backend.graph(30.0)
        assert [(e["source"], e["target"]) for e in dg["edges"]] == [
            ("default/productpage-v1", "default/reviews-v1")
        ]
        assert dg["edges"][0]["p50_ms"] == pytest.approx(17.5)
        ds = await backend.series(REVIEWS, 20.0)
        assert any(r and abs(r - 50 / 60) < 0.05 for r in ds["success_rate"]), ds
        assert [s["name"] for s in await backend.services()] == [REVIEWS]
        assert src.failures == 0 and src.queries > 10

        # 'diktyo control-plane --prometheus URL': its dashboard API answers from Prometheus
        # (the control plane itself scrapes no sidecar here)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.cli.main", "control-plane", "--port", "0",
            "--prometheus", url, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "DIKTYO_HOME": str(tmp_path / "home")},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            cp_url = line.split("serving on ")[1].split(",")[0].strip()
            token = admin_token.read(tmp_path / "home")  # 'control-plane' created it
            assert token is not None

            async def request(method: str, url: str, timeout: float) -> tuple[int, bytes]:
                auth = {"Authorization": f"Bearer {token}"}
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
                    s.request(method, url, headers=auth) as r,
                ):
                    return r.status, await r.read()

            status, body = await request("GET", cp_url + "/api/graph?window=30", timeout=10)
            assert status == 200, body
            cg = json.loads(body)
            assert [(e["source"], e["target"]) for e in cg["edges"]] == [
                ("default/productpage-v1", "default/reviews-v1")
            ]
            status, body = await request("GET", cp_url + "/telemetry/api/metrics/graph", timeout=10)
            assert json.loads(body)["edges"] == []  # the embedded store: no sidecars scraped
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


def test_control_plane_reads_prometheus_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """'diktyo up --prometheus URL' hands the URL to its mesh's ControlPlane this way."""
    from diktyo.control.server import ControlPlane

    monkeypatch.setenv("DIKTYO_PROMETHEUS", "http://127.0.0.1:9")
    cp = ControlPlane()
    assert isinstance(cp.metric_source, PrometheusSource)
    assert cp.metric_source.url == "http://127.0.0.1:9" and cp.metrics is not cp.metric_source
    monkeypatch.delenv("DIKTYO_PROMETHEUS")
    cp = ControlPlane(prometheus_url=None)
    assert cp.metric_source is cp.metrics


async def test_a_slow_prometheus_does_not_block_the_event_loop() -> None:
    """Regression: queries were blocking urllib calls made on the control plane's loop."""
    release = asyncio.Event()
    asked = 0

    async def query(_: web.Request) -> web.Response:
        nonlocal asked
        asked += 1
        await release.wait()
        return web.json_response({"status": "success", "data": {"result": []}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        src = PrometheusSource(f"http://127.0.0.1:{port}", timeout=30, cache_ttl=0.0)
        pending = asyncio.ensure_future(src.graph(60))
        # while Prometheus holds every query, the loop keeps running other work: here it
        # serves all the graph's queries at once (they are concurrent, not one by one)
        await eventually(
            lambda: asked >= len(graph_queries(60)), timeout=20, interval=0.01, what="all queries"
        )
        assert asked == len(graph_queries(60)) and not pending.done()
        release.set()
        graph = await asyncio.wait_for(pending, 20)
        assert graph["edges"] == [] and src.failures == 0
    finally:
        await runner.cleanup()

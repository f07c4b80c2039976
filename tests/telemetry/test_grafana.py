"""Grafana dashboards: committed files equal the generator, and every panel's PromQL runs on a
real Prometheus (Debian's package) that scraped real Istio metrics, and most return data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from diktyo.telemetry.exposition import CONTENT_TYPE, render
from diktyo.telemetry.grafana import DASHBOARDS
from diktyo.telemetry.grafana import render as render_dashboard
from diktyo.telemetry.httpclient import request
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.prometheus_config import scrape_config

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
PROMETHEUS = shutil.which("prometheus")
SUBST = {
    "$__rate_interval": "1m",
    "$namespace": ".*",
    "$service": "reviews.default.svc.cluster.local",
    "$workload": "reviews-v1",
}


def test_committed_dashboards_are_generated() -> None:
    for name, build in DASHBOARDS.items():
        assert (GRAFANA / name).read_text() == render_dashboard(build), (
            f"deploy/grafana/{name} is stale: run python -m diktyo.telemetry.grafana"
        )


def all_exprs() -> list[tuple[str, str, str]]:
    out = []
    for f in sorted(GRAFANA.glob("*.json")):
        dash = json.loads(f.read_text())
        for p in dash["panels"]:
            for t in p["targets"]:
                expr = t["expr"]
                for k, v in SUBST.items():
                    expr = expr.replace(k, v)
                out.append((f.name, p["title"], expr))
    return out


def test_three_dashboards_on_istio_names() -> None:
    names = {f.name for f in GRAFANA.glob("*.json")}
    assert {"diktyo-mesh-dashboard.json", "diktyo-service-dashboard.json",
            "diktyo-workload-dashboard.json"} <= names  # fmt: skip
    for _, _, expr in all_exprs():
        assert ("istio_" in expr or "envoy_cluster_" in expr) and "$" not in expr, expr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
async def test_every_panel_query_runs_on_real_prometheus(tmp_path: Path) -> None:
    m = IstioMetrics()
    pp = WorkloadInfo.from_labels("productpage-v1", "default", {"app": "productpage", "version": "v1"})
    rv = WorkloadInfo.from_labels("reviews-v1", "default", {"app": "reviews", "version": "v1"})
    svc = "reviews.default.svc.cluster.local"
    src = m.peer(PeerLabels.build("source", pp, rv, svc))
    dst = m.peer(PeerLabels.build("destination", pp, rv, svc, mtls=True))

    def traffic() -> None:
        for key in (src, dst):
            for _ in range(20):
                m.record(key, 200, "-", 12.0, 100, 300)
            m.record(key, 503, "UO", 0.4, 0, 20)
        m.tcp_bytes(dst, 1000, 500)

    async def stats(_: web.Request) -> web.Response:
        traffic()  # every scrape sees more requests, so rates are not zero
        return web.Response(text=render(m), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/stats/prometheus", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sport = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(scrape_config([f"127.0.0.1:{sport}"], scrape_interval="1s"))
    pport = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{pport}", stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    async def query(expr: str) -> tuple[str, list]:
        url = f"http://127.0.0.1:{pport}/api/v1/query?query={quote(expr)}"
        _status, body = await request("GET", url, timeout=5)
        data = json.loads(body)
        return data["status"], data.get("data", {}).get("result", [])

    try:
        probe = 'sum(rate(istio_requests_total{reporter="source"}[1m]))'
        deadline = time.monotonic() + 40
        ready = False
        while time.monotonic() < deadline and not ready:
            assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(OSError, TimeoutError, ValueError, KeyError):
                status, result = await query(probe)
                ready = status == "success" and bool(result) and float(result[0]["value"][1]) > 0
            if not ready:
                await asyncio.sleep(0.5)
        assert ready, (tmp_path / "prometheus.log").read_text()[-2000:]
        empty = []
        exprs = all_exprs()
        for dash, title, expr in exprs:
            status, result = await query(expr)
            assert status == "success", (dash, title, expr)
            if not result:
                empty.append((dash, title))
        # a few panels legitimately have nothing here (e.g. flags by a label with no flags)
        assert len(empty) <= len(exprs) // 4, empty
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        await runner.cleanup()

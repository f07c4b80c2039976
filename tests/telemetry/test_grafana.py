"""Grafana dashboards: committed files equal the generator, and every panel's PromQL runs on a
real Prometheus (Debian's package) that scraped real Istio metrics, and most return data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diktyo.telemetry.exposition import render
from diktyo.telemetry.grafana import DASHBOARDS
from diktyo.telemetry.grafana import render as render_dashboard
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.testing import eventually
from diktyo.testing.prometheus import PROMETHEUS, prometheus_scraping

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
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

    def scrape() -> str:
        traffic()  # every scrape sees more requests, so rates are not zero
        return render(m)

    async with prometheus_scraping(scrape, tmp_path) as prom:
        probe = 'sum(rate(istio_requests_total{reporter="source"}[1m]))'

        async def rate_seen() -> bool:
            assert prom.process.returncode is None, prom.log_tail()
            status, result = await prom.query(probe)
            return status == "success" and bool(result) and float(result[0]["value"][1]) > 0

        await eventually(
            rate_seen, timeout=40, interval=0.5, ignore=(OSError, TimeoutError, ValueError, KeyError),
            what=lambda: f"a request rate in Prometheus; log:\n{prom.log_tail()}",
        )  # fmt: skip
        empty = []
        exprs = all_exprs()
        for dash, title, expr in exprs:
            status, result = await prom.query(expr)
            assert status == "success", (dash, title, expr)
            if not result:
                empty.append((dash, title))
        # a few panels legitimately have nothing here (e.g. flags by a label with no flags)
        assert len(empty) <= len(exprs) // 4, empty

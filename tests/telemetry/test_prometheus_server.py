"""A real Prometheus server scrapes our exposition and answers PromQL on Istio's metric names."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from diktyo.telemetry.exposition import render
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.telemetry.prometheus_config import DEFAULT_TARGETS, Target, scrape_config
from diktyo.testing import eventually
from diktyo.testing.prometheus import prometheus_scraping

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
PROMTOOL = shutil.which("promtool")
REPO = Path(__file__).resolve().parents[2]


def test_committed_config_is_generated_and_valid(tmp_path: Path) -> None:
    committed = (REPO / "deploy/prometheus/prometheus.yml").read_text()
    assert committed == scrape_config(DEFAULT_TARGETS), (
        "deploy/prometheus/prometheus.yml is stale: run "
        "python -m diktyo.telemetry.prometheus_config > deploy/prometheus/prometheus.yml"
    )
    if PROMTOOL:
        cfg = tmp_path / "p.yml"
        cfg.write_text(scrape_config([Target("127.0.0.1:1", {"workload": 'a"b'})], "1s"))
        res = subprocess.run([PROMTOOL, "check", "config", str(cfg)], capture_output=True,
                             text=True, timeout=30, check=False)  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr


def dashboard_exprs() -> list[str]:
    dash = json.loads((REPO / "deploy/grafana/diktyo-mesh-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return [e.replace("$__rate_interval", "1m").replace("$namespace", ".*") for e in exprs]


def test_dashboard_uses_istio_metric_names() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    text = " ".join(exprs)
    for name in ("istio_requests_total", "istio_request_duration_milliseconds_bucket",
                 "istio_response_bytes_bucket", "istio_tcp_sent_bytes_total"):  # fmt: skip
        assert name in text


def test_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="host:port"):
        scrape_config(["nohost"])
    with pytest.raises(ValueError, match="duration"):
        scrape_config(["127.0.0.1:1"], scrape_interval="fast")


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)
async def test_real_prometheus_scrapes_istio_metrics(tmp_path: Path) -> None:
    m = IstioMetrics()
    pp = WorkloadInfo.from_labels(
        "productpage-v1", "default", {"app": "productpage", "version": "v1"}
    )
    for v, n in (("v1", 7), ("v2", 5)):
        rv = WorkloadInfo.from_labels(f"reviews-{v}", "default", {"app": "reviews", "version": v})
        key = m.peer(PeerLabels.build("source", pp, rv, "reviews.default.svc.cluster.local"))
        for _ in range(n):
            m.record(key, 200, "-", 12.0, 0, 300)
        m.record(key, 503, "UO", 0.3, 0, 0)
    dkey = m.peer(PeerLabels.build("destination", pp, None, "reviews.default.svc.cluster.local"))
    m.record(dkey, 200, "-", 1.0, 0, 0)  # must not be counted by reporter="source"

    async with prometheus_scraping(lambda: render(m), tmp_path) as prom:
        query = 'sum(istio_requests_total{reporter="source"})'
        value = None

        async def scraped() -> bool:
            nonlocal value
            assert prom.process.returncode is None, prom.log_tail()
            with contextlib.suppress(OSError, TimeoutError, ValueError, KeyError):
                status, result = await prom.query(query)
                if status == "success" and result:
                    value = float(result[0]["value"][1])
            return value == 14.0

        await eventually(
            scraped,
            timeout=30,
            interval=0.5,
            what=lambda: f"Prometheus answering 14 (last {value}); log:\n" + prom.log_tail(),
        )
        q2 = "histogram_quantile(0.5,sum(rate(istio_request_duration_milliseconds_bucket[1m]))by(le))"
        status, _ = await prom.query(q2)
        assert status == "success"

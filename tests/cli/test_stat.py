"""``diktyo stat``: table formatting (pure) and the command against a real running control plane."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from diktyo.cli.main import main
from diktyo.cli.stat import (
    StatRow,
    Target,
    build_rows,
    format_table,
    parse_target,
    parse_window,
)
from diktyo.control.model import ProxyNode
from diktyo.control.server import ControlPlane
from diktyo.snapshot.model import Node
from diktyo.telemetry.exposition import CONTENT_TYPE, render
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.testing import eventually
from diktyo.testing.controlplane import admin_headers, write_admin_token

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"


def edge(reporter: str, src: str, svc: str, dst: str, ok: float, failed: float = 0.0,
         ms: float = 12.0) -> dict[str, Any]:  # fmt: skip
    """An /api/metrics/edges entry: all durations in the bucket holding ``ms``."""
    n = ok + failed
    les = [0.5, 1, 5, 10, 25, 50, 100, 250]
    buckets = [[le, n if ms <= le else 0.0] for le in les] + [["+Inf", n]]
    return {"reporter": reporter, "source_workload": src, "source_workload_namespace": "default",
            "source_version": "v1", "destination_service": svc, "destination_workload": dst,
            "destination_version": "v1", "requests": n, "errors": failed,
            "codes": {"2xx": ok, "5xx": failed}, "durationBuckets": buckets,
            "durationSum": n * ms, "tcpSent": 0.0, "tcpReceived": 0.0, "tcpOpened": 0.0}  # fmt: skip


REPLICAS = [
    {"workload": "productpage-v1", "namespace": "default", "state": "ready"},
    {"workload": "reviews-v1", "namespace": "default", "state": "ready"},
    {"workload": "reviews-v1", "namespace": "default", "state": "starting"},
    {"workload": "ratings-v1", "namespace": "default", "state": "ready"},
]


# ----------------------------------------------------------------------------- pure


def test_parse_window_and_target() -> None:
    assert parse_window("1m") == 60 and parse_window("30s") == 30 and parse_window("90") == 90
    assert parse_window("1h") == 3600
    for bad in ("soon", "2h", "0s", "-1m"):
        with pytest.raises(ValueError, match="--window"):
            parse_window(bad)
    assert parse_target(None) == Target("deploy")
    assert parse_target("svc") == Target("svc")
    assert parse_target("deploy/reviews-v1") == Target("deploy", "reviews-v1")
    assert parse_target("svc/reviews") == Target("svc", "reviews")
    assert parse_target("reviews-v1") == Target("deploy", "reviews-v1")
    with pytest.raises(ValueError, match="svc/SERVICE"):
        parse_target("pod/x/y")


def test_table_per_workload_uses_destination_reporter() -> None:
    edges = [
        # the callers' view must not count: productpage's sidecar saw 10 x 500 more
        edge("source", "productpage-v1", REVIEWS, "reviews-v1", ok=50, failed=10),
        edge("destination", "productpage-v1", REVIEWS, "reviews-v1", ok=57, failed=3, ms=12),
    ]
    rows = build_rows(Target(), edges, REPLICAS, 60.0)
    assert [r.name for r in rows] == ["productpage-v1", "ratings-v1", "reviews-v1"]
    assert format_table(rows).splitlines() == [
        "NAME            MESHED  SUCCESS  RPS     LATENCY_P50  LATENCY_P95  LATENCY_P99",
        "productpage-v1  1/1     -        -       -            -            -",
        "ratings-v1      1/1     -        -       -            -            -",
        "reviews-v1      1/2     95.00%   1.0rps  18ms         24ms         25ms",
    ]
    wide = format_table(rows, wide=True).splitlines()
    assert wide[0].split() == ["NAMESPACE", "NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50",
                               "LATENCY_P95", "LATENCY_P99", "REQUESTS", "TCP_OPENED",
                               "TCP_READ", "TCP_WRITE"]  # fmt: skip
    assert wide[3].split() == ["default", "reviews-v1", "1/2", "95.00%", "1.0rps", "18ms",
                               "24ms", "25ms", "60", "-", "-", "-"]  # fmt: skip
    (one,) = build_rows(Target("deploy", "reviews-v1"), edges, REPLICAS, 60.0)
    assert one.to_json()["latencyP50Ms"] == pytest.approx(17.5)
    with pytest.raises(LookupError, match="no workload 'nope'.*reviews-v1"):
        build_rows(Target("deploy", "nope"), edges, REPLICAS, 60.0)


def test_services_from_and_small_latencies() -> None:
    edges = [
        edge("destination", "productpage-v1", REVIEWS, "reviews-v1", ok=30, ms=0.8),
        edge("destination", "reviews-v2", RATINGS, "ratings-v1", ok=3, ms=3.0),
        # an external host has no sidecar of its own: its callers' view is used
        edge("source", "reviews-v2", "api.example.com", "unknown", ok=2, failed=2, ms=3.0),
    ]
    rows = build_rows(Target("svc"), edges, REPLICAS, 60.0)
    assert [(r.name, r.requests) for r in rows] == [("api.example.com", 4), ("ratings", 3),
                                                   ("reviews", 30)]  # fmt: skip
    lines = format_table(rows).splitlines()
    assert lines[1].split() == ["api.example.com", "-", "50.00%", "0.07rps", "3.0ms", "4.8ms",
                                "5.0ms"]  # fmt: skip
    assert lines[3].split()[1] == "1/2"  # replicas of the workloads behind reviews
    assert lines[3].split()[3:5] == ["0.5rps", "0.8ms"]
    only = build_rows(Target("svc", "ratings"), edges, REPLICAS, 60.0)
    assert [r.name for r in only] == ["ratings"]
    from_pp = build_rows(Target(), edges, REPLICAS, 60.0, from_workload="productpage-v1")
    assert {r.name: r.requests for r in from_pp} == {"productpage-v1": 0, "ratings-v1": 0,
                                                     "reviews-v1": 30}  # fmt: skip
    with pytest.raises(LookupError, match="services with traffic: api.example.com, ratings"):
        build_rows(Target("svc", "details"), edges, REPLICAS, 60.0)
    # without replicas (a standalone control plane) workloads come from the metrics
    (row,) = build_rows(Target(), edges[:1], [], 60.0)
    assert (row.name, row.namespace, row.meshed) == ("reviews-v1", "default", "-")
    assert StatRow("x").to_json()["success"] is None


# ----------------------------------------------------------------------------- real control plane


@contextlib.asynccontextmanager
async def sidecar_stats(metrics: IstioMetrics) -> AsyncIterator[str]:
    """A sidecar admin endpoint serving ``metrics`` at /stats/prometheus."""

    async def stats(_: web.Request) -> web.Response:
        return web.Response(text=render(metrics), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/stats/prometheus", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def wait_scrapes(cp: ControlPlane, n: int) -> None:
    await eventually(
        lambda: cp.metrics.scrapes >= n, timeout=15, what=f"{n} scrapes of the sidecar"
    )


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_stat_against_a_running_control_plane(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = IstioMetrics()
    pp = WorkloadInfo.from_labels(
        "productpage-v1", "default", {"app": "productpage", "version": "v1"}
    )
    rv = WorkloadInfo.from_labels("reviews-v1", "default", {"app": "reviews", "version": "v1"})
    src = m.peer(PeerLabels.build("source", pp, rv, REVIEWS))
    dst = m.peer(PeerLabels.build("destination", pp, rv, REVIEWS))
    cp = ControlPlane(scrape_interval=0.1)
    cp.workloads_provider = lambda: REPLICAS
    monkeypatch.setenv("DIKTYO_HOME", str(tmp_path))  # the CLI runs in-process
    write_admin_token(cp, tmp_path)
    await cp.start()
    try:
        async with sidecar_stats(m) as admin:
            cp.add_proxy(ProxyNode(node=Node(id="reviews-v1-1.default", workload="reviews-v1")),
                         admin_url=admin)  # fmt: skip
            await wait_scrapes(cp, 1)  # the first scrape only sets the baseline
            for _ in range(18):
                m.record(src, 200, "-", 12.0, 0, 10)
                m.record(dst, 200, "-", 12.0, 0, 10)
            for _ in range(2):
                m.record(src, 503, "UO", 1.0, 0, 0)
                m.record(dst, 503, "-", 3.0, 0, 0)
            n = cp.metrics.scrapes
            await wait_scrapes(cp, n + 2)

            code, out, err = await run_cli(capsys, "stat", "--control-plane", cp.url)
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].split() == ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50",
                                        "LATENCY_P95", "LATENCY_P99"]  # fmt: skip
            rows = {line.split()[0]: line.split() for line in lines[1:]}
            assert rows["productpage-v1"][1:] == ["1/1", "-", "-", "-", "-", "-"]
            assert rows["reviews-v1"][1:4] == ["1/2", "90.00%", "0.3rps"]  # 20 requests / 60 s
            assert rows["reviews-v1"][4] == "17ms"  # p50: 10 of 20 in (10, 25] ... interpolated

            code, out, err = await run_cli(capsys, "stat", "svc/reviews", "--window", "30s",
                                           "-o", "json", "--control-plane", cp.url)  # fmt: skip
            assert code == 0, err
            (row,) = json.loads(out)
            assert row["name"] == "reviews" and row["requests"] == 20
            assert row["success"] == pytest.approx(0.9) and row["rps"] == pytest.approx(20 / 30)

            code, out, err = await run_cli(capsys, "stat", "reviews-v1", "--from",
                                           "deploy/ratings-v1", "--control-plane", cp.url)  # fmt: skip
            assert code == 0 and out.splitlines()[1].split()[2:] == ["-"] * 5, out

            code, out, err = await run_cli(capsys, "stat", "deploy/nope", "--control-plane", cp.url)
            assert code == 1 and "no workload 'nope'" in err and "reviews-v1" in err

            code, out, err = await run_cli(capsys, "stat", "--window", "soon",
                                           "--control-plane", cp.url)  # fmt: skip
            assert code == 2 and "30s, 1m or 1h" in err

            # the raw endpoint behind it: per-reporter edges with buckets
            url = cp.url + "/telemetry/api/metrics/edges?window=60&reporter=destination"
            body = await asyncio.to_thread(get_json, url, admin_headers(cp))
            (e,) = body["edges"]
            assert e["reporter"] == "destination" and e["requests"] == 20 and e["errors"] == 2
            assert e["durationBuckets"][-1] == ["+Inf", 20.0]
    finally:
        await cp.stop()


async def test_stat_without_observability_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = ControlPlane(observability=False)
    monkeypatch.setenv("DIKTYO_HOME", str(tmp_path))
    write_admin_token(cp, tmp_path)
    await cp.start()
    try:
        code, _, err = await run_cli(capsys, "stat", "--control-plane", cp.url)
        assert code == 1 and "no metric store API" in err
    finally:
        await cp.stop()


def test_stat_with_no_mesh_running_explains_how_to_start_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DIKTYO_CONTROL_PLANE"}
    env["DIKTYO_HOME"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-m", "diktyo.cli.main", "stat"], env=env,
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert res.returncode == 1
    assert "no control plane found" in res.stderr and "diktyo up -f" in res.stderr
    assert "--control-plane URL" in res.stderr
    # a control plane that is not there: say where we looked and what to check
    res = subprocess.run([sys.executable, "-m", "diktyo.cli.main", "stat", "--control-plane",
                          "http://127.0.0.1:9"], env=env, capture_output=True, text=True,
                         timeout=30, check=False)  # fmt: skip
    assert (
        res.returncode == 1 and "cannot reach the control plane at http://127.0.0.1:9" in res.stderr
    )


# ----------------------------------------------------------------------------- real mesh

TINY_APP = Path(__file__).resolve().parents[1] / "e2e" / "apps" / "tiny_app.py"
TINY_MESH = f"""
name: stat
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
  - name: front
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello, version: v1}}
    command: ["{{python}}", "{TINY_APP}"]
  - name: front-v1
    labels: {{app: front, version: v1}}
    command: ["{{python}}", "{TINY_APP}"]
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_stat_on_a_real_mesh(tmp_path: Path) -> None:
    from diktyo.platform.harness import MeshThread
    from diktyo.platform.mesh import load_mesh

    (tmp_path / "mesh.yaml").write_text(TINY_MESH)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    env = {k: v for k, v in os.environ.items() if k != "DIKTYO_CONTROL_PLANE"}
    env["DIKTYO_HOME"] = str(tmp_path / "home")
    with MeshThread(load_mesh(tmp_path / "mesh.yaml")) as mesh:
        write_admin_token(mesh, tmp_path / "home")  # what the CLI sends
        mesh.wait_synced()
        cp = mesh.mesh.cp if mesh.mesh else None
        assert cp is not None and cp._scraper is not None
        mesh.call(cp._scraper.scrape_once())  # baseline of every sidecar's counters
        front = next(w for w in mesh.describe()["workloads"] if w["name"] == "front-v1-1")
        front_url = f"http://127.0.0.1:{front['app_ports']['9080']}/call/hello:9080/"
        for _ in range(10):
            with opener.open(front_url, timeout=10) as r:
                assert r.status == 200
        mesh.call(cp._scraper.scrape_once())

        def stat(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "diktyo.cli.main", "stat", "--control-plane", mesh.url,
                 *args], env=env, capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip

        res = stat()
        assert res.returncode == 0, res.stderr
        rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:]}
        assert rows["front-v1"][1:] == ["1/1", "-", "-", "-", "-", "-"], res.stdout
        hello = rows["hello-v1"]
        assert hello[1:4] == ["1/1", "100.00%", "0.2rps"], res.stdout
        assert all(c.endswith("ms") for c in hello[4:7]), res.stdout
        res = stat("svc/hello", "--from", "front-v1", "-o", "json")
        (row,) = json.loads(res.stdout)
        assert row["name"] == "hello" and row["requests"] == 10 and row["success"] == 1.0
        assert 0 < row["latencyP50Ms"] <= row["latencyP99Ms"]

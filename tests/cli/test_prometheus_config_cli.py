"""``diktyo prometheus-config``: a REAL Prometheus scrapes the running mesh's sidecars with it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from diktyo.cli.prometheus_config import targets_of
from diktyo.control.server import ControlPlane
from diktyo.telemetry.exposition import CONTENT_TYPE, render
from diktyo.telemetry.httpclient import request
from diktyo.telemetry.istio_metrics import IstioMetrics, PeerLabels, WorkloadInfo
from diktyo.testing import eventually, free_port
from diktyo.testing.controlplane import cli_env, write_admin_token

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
PROMTOOL = shutil.which("promtool")


def test_targets_are_labelled_like_istio_pods() -> None:
    replicas = [
        {"name": "reviews-v1-2", "workload": "reviews-v1", "namespace": "default",
         "version": "v1", "admin_port": 15001},
        {"name": "reviews-v1-1", "workload": "reviews-v1", "namespace": "default",
         "version": "v1", "admin_port": 15000},
        {"name": "broken-1", "workload": "broken", "admin_port": None},
    ]  # fmt: skip
    ts = targets_of(replicas)
    assert [t.address for t in ts] == ["127.0.0.1:15000", "127.0.0.1:15001"]
    assert dict(ts[0].labels) == {"workload": "reviews-v1", "namespace": "default",
                                  "pod": "reviews-v1-1", "version": "v1"}  # fmt: skip


async def diktyo(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)
async def test_real_prometheus_scrapes_the_mesh_with_the_config(tmp_path: Path) -> None:
    m = IstioMetrics()
    pp = WorkloadInfo.from_labels("productpage-v1", "default", {"app": "productpage"})
    rv = WorkloadInfo.from_labels("reviews-v1", "default", {"app": "reviews", "version": "v1"})
    m.record(m.peer(PeerLabels.build("destination", pp, rv, "reviews.default.svc.cluster.local")),
             200, "-", 5.0, 0, 0)  # fmt: skip

    async def stats(_: web.Request) -> web.Response:
        return web.Response(text=render(m), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/stats/prometheus", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cp = ControlPlane()
    cp.workloads_provider = lambda: [
        {"name": "reviews-v1-1", "workload": "reviews-v1", "namespace": "default",
         "version": "v1", "state": "ready", "admin_port": admin_port},
    ]  # fmt: skip
    await cp.start()
    env = {k: v for k, v in os.environ.items() if k != "DIKTYO_CONTROL_PLANE"}
    env["DIKTYO_HOME"] = str(tmp_path)
    write_admin_token(cp, tmp_path)
    proc = None
    try:
        cfg = tmp_path / "prometheus.yml"
        code, out, err = await diktyo("prometheus-config", "--scrape-interval", "1s",
                                      "--control-plane", cp.url, env=env)  # fmt: skip
        assert code == 0, err
        assert f'targets: ["127.0.0.1:{admin_port}"]' in out and 'pod: "reviews-v1-1"' in out
        cfg.write_text(out)
        if PROMTOOL:
            res = await asyncio.to_thread(
                subprocess.run, [PROMTOOL, "check", "config", str(cfg)], capture_output=True,
                text=True, timeout=30, check=False,
            )  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr

        code, _, err = await diktyo("prometheus-config", "--scrape-interval", "often",
                                    "--control-plane", cp.url, env=env)  # fmt: skip
        assert code == 2 and "Prometheus duration" in err

        pport = free_port()
        assert PROMETHEUS is not None
        log = tmp_path / "prometheus.log"
        with log.open("w") as logf:
            proc = await asyncio.create_subprocess_exec(
                PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{pport}", stdout=logf,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        query = 'sum(istio_requests_total{workload="reviews-v1",pod="reviews-v1-1"})'
        url = f"http://127.0.0.1:{pport}/api/v1/query?query={quote(query)}"
        value = None

        async def scraped() -> bool:
            nonlocal value
            assert proc is not None and proc.returncode is None, log.read_text()[-2000:]
            try:
                status, body = await request("GET", url, timeout=2)
                result = json.loads(body)["data"]["result"] if status == 200 else []
                value = float(result[0]["value"][1]) if result else None
            except (OSError, TimeoutError):
                pass
            return value == 1.0

        await eventually(
            scraped,
            timeout=30,
            interval=0.3,
            what=lambda: f"Prometheus answering 1.0 (last {value}); log: {log.read_text()[-2000:]}",
        )
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await cp.stop()
        await runner.cleanup()

    env["DIKTYO_CONTROL_PLANE"] = cp.url  # stopped: a clear error
    code, _, err = await diktyo("prometheus-config", env=env)
    assert code == 1 and "cannot reach the control plane" in err


async def test_standalone_control_plane_has_no_targets(tmp_path: Path) -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    try:
        env = {**cli_env(cp, tmp_path), "DIKTYO_CONTROL_PLANE": cp.url}
        code, _, err = await diktyo("prometheus-config", env=env)
        assert code == 1 and "python -m diktyo.telemetry.prometheus_config" in err
    finally:
        await cp.stop()

"""Supervision like Kubernetes': crashed apps and sidecars restart with CrashLoopBackOff."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time

import aiohttp
import pytest
from test_platform_local import HELPERS, TINY_APP, fake_sidecar, tiny_translate

from diktyo.platform.mesh import MeshFileError, load_mesh_text
from diktyo.platform.state import pid_alive
from diktyo.platform.supervisor import BackOff, LocalMesh, exit_reason
from diktyo.testing import eventually
from diktyo.testing.controlplane import admin_headers


def test_backoff_is_kubernetes_crashloopbackoff() -> None:
    b = BackOff()  # Kubernetes' defaults: 10 s doubling to 5 min, reset after 10 min running
    delays = [b.next_delay(ran_for=1.0) for _ in range(8)]
    assert delays == [0.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert b.next_delay(ran_for=599.0) == 300.0
    assert b.next_delay(ran_for=600.0) == 0.0  # ran 10 minutes: the series starts again
    assert b.next_delay(ran_for=2.0) == 10.0
    short = BackOff(base=0.5, cap=1.5, reset_after=60)
    assert [short.next_delay(0.1) for _ in range(5)] == [0.0, 0.5, 1.0, 1.5, 1.5]


def test_exit_reasons_name_the_signal() -> None:
    assert exit_reason(-9) == {"exit_code": 137, "signal": "SIGKILL", "reason": "killed by SIGKILL"}
    assert exit_reason(-15)["signal"] == "SIGTERM"
    assert exit_reason(3) == {"exit_code": 3, "signal": None, "reason": "exited with code 3"}
    assert exit_reason(0)["reason"] == "Completed"


def test_restart_settings_are_checked() -> None:
    base = "workloads: []\nrestart: {policy: %s, backoffBase: %s, backoffMax: %s}\n"
    spec = load_mesh_text(base % ("OnFailure", 0.2, 2), "m.yaml")
    assert spec.restart.policy == "OnFailure" and spec.restart.backoff_base == 0.2
    assert load_mesh_text("workloads: []\n", "m.yaml").restart.backoff_base == 10.0
    with pytest.raises(MeshFileError, match=r"m.yaml:2:\d+: error: restart.policy"):
        load_mesh_text(base % ("Sometimes", 1, 2), "m.yaml")
    with pytest.raises(MeshFileError, match="backoffMax .* must not be below backoffBase"):
        load_mesh_text(base % ("Always", 5, 1), "m.yaml")
    with pytest.raises(MeshFileError, match="restart.backoffBase"):
        load_mesh_text(base % ("Always", 0, 1), "m.yaml")


MESH = f"""
name: crash
restart: {{backoffBase: 0.4, backoffMax: 0.8}}
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello, version: v1}}
    command: ["{{python}}", "{TINY_APP}"]
gateways:
  - ports: [{{port: 8080, hostPort: 0}}]
"""


async def _until(cond, timeout: float = 20.0, what: str = "") -> None:
    await eventually(cond, timeout=timeout, interval=0.02, what=what)


@pytest.mark.slow
async def test_a_crashing_app_restarts_with_back_off_and_serves_again() -> None:
    spec = load_mesh_text(MESH, "crash.yaml", base_dir=str(HELPERS))
    out = io.StringIO()
    mesh = LocalMesh(
        spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=out, ready_timeout=20
    )
    pids: list[int] = []
    try:
        await asyncio.wait_for(mesh.start(), 40)
        rep = mesh.replica("hello-v1-1")
        gw = mesh.gateway_url()
        waits = []
        for n in range(1, 4):
            assert rep.app is not None and rep.app.pid is not None
            pids.append(rep.app.pid)
            old = rep.app.pid
            killed = time.monotonic()
            rep.app.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            await _until(lambda: rep.state == "restarting", what="restarting")
            assert "hello-v1-1" not in mesh.cp.registry.instances  # out while it is down
            await _until(
                lambda old=old: rep.state == "ready" and rep.app is not None and rep.app.pid != old,
                what=f"restart {n}",
            )
            waits.append(time.monotonic() - killed)
            assert rep.containers["app"].restarts == n
            assert rep.containers["app"].last_exit["signal"] == "SIGKILL"  # type: ignore[index]
            assert "hello-v1-1" in mesh.cp.registry.instances  # back in the endpoints
        # restart 1 immediately, then 0.4 s, then 0.8 s of back-off (Kubernetes: 0, 10, 20 s)
        assert waits[1] >= 0.4 and waits[2] >= 0.8, waits
        text = out.getvalue()
        assert "[hello-v1-1] app killed by SIGKILL; restarting it (restart 1)" in text
        assert "restarting it in 0.4s (back-off) (restart 2)" in text
        assert "restarting it in 0.8s (back-off) (restart 3)" in text
        mesh.cp.push_now()
        assert await mesh.cp.sync(10.0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(gw + "/") as r:  # traffic reaches the restarted app
                assert r.status == 200, await r.text()
                assert json.loads(await r.read())["pod"] == "hello-v1-1"
            async with s.get(mesh.cp.url + "/v1/workloads", headers=admin_headers(mesh)) as r:
                w = next(x for x in (await r.json())["workloads"] if x["name"] == "hello-v1-1")
        assert w["restarts"] == 3 and w["containers"]["app"]["restarts"] == 3
        assert w["last_exit"]["container"] == "app"
        assert w["last_exit"]["exit_code"] == 137 and w["last_exit"]["signal"] == "SIGKILL"
    finally:
        pids += mesh.pids()
        await asyncio.wait_for(mesh.stop(), 30)
    assert [p for p in pids if pid_alive(p)] == []


@pytest.mark.slow
async def test_a_killed_sidecar_restarts_on_its_ports_and_policy_never_leaves_it() -> None:
    spec = load_mesh_text(MESH, "crash.yaml", base_dir=str(HELPERS))
    out = io.StringIO()
    mesh = LocalMesh(
        spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=out, ready_timeout=20
    )
    try:
        await asyncio.wait_for(mesh.start(), 40)
        rep = mesh.replica("hello-v1-1")
        assert rep.sidecar is not None and rep.sidecar.proc is not None
        old, admin = rep.sidecar.pid, rep.admin_port
        rep.sidecar.proc.send_signal(signal.SIGKILL)
        await _until(
            lambda: rep.state == "ready" and rep.sidecar is not None and rep.sidecar.pid != old,
            what="sidecar restart",
        )
        assert rep.admin_port == admin
        st = rep.containers["sidecar"]
        assert st.restarts == 1 and st.last_exit["reason"] == "killed by SIGKILL"  # type: ignore[index]
        assert "app" not in rep.containers or rep.containers["app"].restarts == 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            seen: list[int] = []

            async def served() -> bool:  # health checks put the instance back once /ready answers
                async with s.get(mesh.gateway_url() + "/") as r:
                    seen[:] = [r.status]
                    return r.status == 200

            await eventually(served, timeout=10, interval=0.1, what=lambda: f"a 200: {seen}")
    finally:
        await asyncio.wait_for(mesh.stop(), 30)

"""``diktyo dashboard``: URL resolution, browser policy, and the real command (and forwarder)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from diktyo.cli.dashboard import dashboard_url, should_open_browser
from diktyo.control.server import ControlPlane
from diktyo.dashboard import mount as mount_dashboard
from diktyo.telemetry.httpclient import request
from diktyo.testing.controlplane import write_admin_token


def test_browser_only_when_asked_and_possible() -> None:
    desk = {"DISPLAY": ":0"}
    assert should_open_browser(False, desk, "linux")
    assert not should_open_browser(True, desk, "linux")
    assert not should_open_browser(False, {**desk, "CI": "true"}, "linux")
    assert should_open_browser(False, {**desk, "CI": "false"}, "linux")
    assert not should_open_browser(False, {}, "linux")  # headless
    assert should_open_browser(False, {"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert should_open_browser(False, {}, "darwin")


def test_url_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIKTYO_HOME", str(tmp_path))
    monkeypatch.delenv("DIKTYO_CONTROL_PLANE", raising=False)
    with pytest.raises(LookupError, match="diktyo up -f mesh.yaml"):
        dashboard_url()
    # a running mesh (its supervisor pid is alive: ours) publishes its dashboard URL
    state = {"pid": os.getpid(), "control_plane": "http://127.0.0.1:4001",
             "dashboard": "http://127.0.0.1:4001/"}  # fmt: skip
    (tmp_path / "mesh.json").write_text(json.dumps(state))
    assert dashboard_url() == "http://127.0.0.1:4001/"
    monkeypatch.setenv("DIKTYO_CONTROL_PLANE", "http://127.0.0.1:4002/")
    assert dashboard_url() == "http://127.0.0.1:4002/"
    assert dashboard_url("http://127.0.0.1:4003") == "http://127.0.0.1:4003/"
    # a stale state file (dead supervisor) is not a running mesh
    monkeypatch.delenv("DIKTYO_CONTROL_PLANE")
    state["pid"] = 2**22 + 12345
    (tmp_path / "mesh.json").write_text(json.dumps(state))
    with pytest.raises(LookupError, match="no control plane found"):
        dashboard_url()


async def diktyo(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_command_prints_url_and_forwards(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DIKTYO_CONTROL_PLANE", "DISPLAY")}
    env["DIKTYO_HOME"] = str(tmp_path)
    cp = ControlPlane()
    mount_dashboard(cp)
    await cp.start()
    write_admin_token(cp, tmp_path)
    try:
        proc = await diktyo(
            "dashboard", "--control-plane", cp.url, env=env
        )  # no display: no browser
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        # the link carries the admin credential, like Jupyter's
        assert out.decode().strip() == f"{cp.url}/?token={cp.admin_token}"

        env_cp = {**env, "DIKTYO_CONTROL_PLANE": cp.url}
        proc = await diktyo(
            "dashboard", "--no-browser", "--port-forward", "--port", "0", env=env_cp
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line.startswith("dashboard: http://127.0.0.1:") and cp.url in line, line
            local = line.split()[1]
            assert local != cp.url + "/"
            assert local.endswith(f"/?token={cp.admin_token}")
            status, body = await request("GET", local, timeout=5)
            assert status == 302  # the token goes into a cookie, out of the address bar
            status, body = await request("GET", local.split("?")[0], timeout=5)
            assert status == 401 and b"admin-token" in body  # no cookie, no token: refused
            status, body = await request("GET", local.split("?")[0] + "healthz", timeout=5)
            assert status == 200
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0
    finally:
        await cp.stop()

    proc = await diktyo("dashboard", "--control-plane", cp.url, env=env)  # stopped now
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"cannot reach the control plane" in err

    proc = await diktyo("dashboard", env=env)  # nothing running, nothing configured
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"diktyo up -f mesh.yaml" in err

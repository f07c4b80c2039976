"""Supervision of a real mesh through the CLI: kill -9 an app and its sidecar, both come back."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_e2e_local_mesh import assert_gone, child_pids, diktyo, get, tiny_mesh

from diktyo.testing import eventually_sync

MESH = tiny_mesh("supervised", ("v1",), restart="{backoffBase: 1, backoffMax: 4}")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    return {**os.environ, "DIKTYO_HOME": str(tmp_path / "home"), "NO_PROXY": "*"}


def _workload(env: dict[str, str], name: str) -> dict:
    state = json.loads(diktyo("status", "-o", "json", env=env).stdout)
    return next(w for w in state["workloads"] if w["name"] == name)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_kill_9_app_and_sidecar_both_restart_and_status_says_why(
    tmp_path: Path, env: dict[str, str]
) -> None:
    up = diktyo("up", "-f", str(tmp_path / "mesh.yaml"), "--detach", "--timeout", "60", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        front = _workload(env, "front-v1-1")
        call = f"http://127.0.0.1:{front['app_ports']['9080']}/call/hello:9080/"
        code, body = get(call)
        assert code == 200 and json.loads(body)["pod"] == "hello-v1-1", body

        hello = _workload(env, "hello-v1-1")
        assert hello["restarts"] == 0 and hello["last_exit"] is None
        os.kill(hello["app_pid"], signal.SIGKILL)
        os.kill(hello["sidecar_pid"], signal.SIGKILL)

        def restarted():
            w = _workload(env, "hello-v1-1")
            ok = (
                w["state"] == "ready"
                and w["containers"].get("app", {}).get("restarts") == 1
                and w["containers"].get("sidecar", {}).get("restarts") == 1
            )
            return w if ok else None

        w = eventually_sync(
            restarted,
            timeout=60,
            interval=0.2,
            what=lambda: f"hello-v1-1 restarted once: {_workload(env, 'hello-v1-1')}",
        )
        assert w["state"] == "ready", w
        assert w["app_pid"] != hello["app_pid"] and w["sidecar_pid"] != hello["sidecar_pid"]
        assert w["restarts"] == 2
        for c in ("app", "sidecar"):
            last = w["containers"][c]["last_exit"]
            assert last["signal"] == "SIGKILL" and last["exit_code"] == 137, w
        assert w["last_exit"]["reason"] == "killed by SIGKILL"

        # traffic resumes: front -> its sidecar -> hello's new sidecar -> hello's new app
        def answered():
            code, body = get(call)
            return (code, body) if code == 200 else None

        code, body = eventually_sync(
            answered, timeout=30, interval=0.2, what="a 200 through hello's new sidecar"
        )
        assert code == 200 and json.loads(body)["pod"] == "hello-v1-1", body
        for _ in range(5):
            assert get(call)[0] == 200

        text = diktyo("status", env=env).stdout
        row = next(line for line in text.splitlines() if line.startswith("hello-v1-1"))
        assert "2 (app 1, sidecar 1)" in row, text
        assert "killed by SIGKILL (137)" in row, text
        assert "RESTARTS" in text and "LAST EXIT" in text
    finally:
        state = json.loads(diktyo("status", "-o", "json", env=env).stdout)
        down = diktyo("down", env=env)
    assert down.returncode == 0, down.stderr
    assert_gone(child_pids(state) + [state["pid"]])

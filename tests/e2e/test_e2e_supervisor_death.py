"""Killing the supervisor (and with it the control plane) under load fails no request.

The sidecars and apps run on with their last snapshot; 'diktyo up' with the same mesh file
adopts them (control plane back on its port, sidecars SYNCED again), or 'diktyo down' stops
them from the state file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from test_e2e_local_mesh import ROUTE_V2, assert_gone, child_pids, diktyo, get, tiny_mesh

from diktyo.platform.state import pid_alive
from diktyo.testing import eventually_sync

MESH = tiny_mesh("survivor", restart="{backoffBase: 1, backoffMax: 2}")


class Traffic:
    """``rps`` requests per second to ``url`` from one thread, until stopped; counts outcomes."""

    def __init__(self, url: str, rps: float = 20.0) -> None:
        self.url, self.interval = url, 1.0 / rps
        self.ok = 0
        self.versions: set[str] = set()
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                code, body = get(self.url)
            except OSError as exc:  # refused, reset, timed out
                code, body = 0, repr(exc)
            if code == 200:
                self.ok += 1
                self.versions.add(json.loads(body)["version"])
            else:
                self.failed.append(f"{code}: {body[:200]}")
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def seen(self) -> str:
        return f"{self.ok} requests ok, {len(self.failed)} failed: {self.failed[:3]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    return {**os.environ, "DIKTYO_HOME": str(tmp_path / "home"), "NO_PROXY": "*"}


def _state(env: dict[str, str]) -> dict:
    return json.loads(diktyo("status", "-o", "json", env=env).stdout)


def _up(tmp_path: Path, env: dict[str, str]) -> dict:
    up = diktyo("up", "-f", str(tmp_path / "mesh.yaml"), "--detach", "--timeout", "60", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    return _state(env)


def _up_foreground(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """'diktyo up' in the foreground (no keeper), as in a terminal; returns once ready."""
    out = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "diktyo.cli.main", "up", "-f", str(tmp_path / "mesh.yaml")],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()

    def ready() -> dict | None:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()  # died: fail at once
        st = _state(env)
        ok = st.get("running") and st.get("pid") == proc.pid and st.get("state") == "ready"
        return st if ok else None

    def what() -> str:
        return "'diktyo up' ready; its log:\n" + (tmp_path / "up.log").read_text()

    return proc, eventually_sync(ready, timeout=60, interval=0.2, what=what)


def _kill_supervisor(state: dict) -> None:
    os.kill(state["pid"], signal.SIGKILL)
    eventually_sync(lambda: not pid_alive(state["pid"]), timeout=10, what="supervisor gone")


def _wait_synced(env: dict[str, str], n: int, timeout: float = 30) -> str:
    """proxy-status shows ``n`` sidecars SYNCED (after an adoption: no config change is
    pending, so a SYNCED row is the new control plane's own, not a stale one)."""
    seen: list[str] = []

    def synced() -> str | None:
        ps = diktyo("proxy-status", env=env)
        seen[:] = [ps.stdout + ps.stderr]
        return ps.stdout if ps.returncode == 0 and ps.stdout.count("SYNCED") == n else None

    return eventually_sync(
        synced, timeout=timeout, interval=0.3, what=lambda: f"{n} sidecars SYNCED: {seen}"
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_supervisor_under_load_then_up_adopts(tmp_path: Path, env: dict[str, str]) -> None:
    proc, before = _up_foreground(tmp_path, env)
    try:
        front = next(w for w in before["workloads"] if w["name"] == "front-v1-1")
        url = f"http://127.0.0.1:{front['app_ports']['9080']}/call/hello:9080/"
        (tmp_path / "v2.yaml").write_text(ROUTE_V2)  # applied config must survive too
        # --wait: back once every sidecar ACKed the route (proxy-status alone can still show
        # the previous version SYNCED while the push is debounced)
        applied = diktyo("apply", "-f", str(tmp_path / "v2.yaml"), "--wait", env=env)
        assert applied.returncode == 0, applied.stderr
        assert "distributed to 3 of 3 sidecars" in applied.stdout, applied.stdout
        with Traffic(url, rps=20) as traffic:
            time.sleep(1.5)  # real time: traffic flows before the kill
            proc.kill()  # SIGKILL; the control plane runs in it: both are gone now
            proc.wait()
            time.sleep(3.0)  # real time: the mesh stays dead under traffic
            orphan = _state(env)
            assert orphan["state"] == "orphaned", orphan
            assert sorted(child_pids(orphan)) == sorted(child_pids(before))
            assert all(pid_alive(p) for p in child_pids(before))
            ps = diktyo("proxy-status", env=env)  # no control plane: a clear hint
            assert ps.returncode != 0 and "adopts the mesh" in ps.stderr, ps.stderr
            text = diktyo("status", env=env).stdout
            assert "orphaned" in text and "'diktyo down' stops it" in text

            up = diktyo(
                "up", "-f", str(tmp_path / "mesh.yaml"), "--detach", "--timeout", "60", env=env
            )
            assert up.returncode == 0, up.stdout + up.stderr
            after = _state(env)
            assert after["state"] == "ready" and after["pid"] != before["pid"]
            assert after["control_plane"] == before["control_plane"]  # same port again
            synced = _wait_synced(env, 3)
            time.sleep(2.0)  # real time: traffic keeps flowing after recovery
            # a loaded machine sends fewer than 20 rps: wait for the requests the count needs
            eventually_sync(lambda: traffic.ok >= 60, timeout=30, what=traffic.seen)
        # ~20 rps for ~8 s across the supervisor's death and the adoption: none failed
        assert traffic.failed == [], traffic.failed[:5]
        assert traffic.ok >= 60, traffic.ok
        assert traffic.versions == {"v2"}  # the applied route held throughout and after
        assert "SYNCED" in synced
        # the same processes serve on: adopted, not restarted
        assert sorted(child_pids(after)) == sorted(child_pids(before))
        assert all(w["restarts"] == 0 for w in after["workloads"])
        log = (Path(env["DIKTYO_HOME"]) / "mesh.log").read_text()
        assert "adopting mesh 'survivor'" in log, log[-2000:]
        assert "served again: 2 resources" in log

        # the new supervisor watches the adopted processes: a killed app comes back
        hello = next(w for w in after["workloads"] if w["name"] == "hello-v1-1")
        os.kill(hello["app_pid"], signal.SIGKILL)

        def restarted() -> dict | None:
            w = next(x for x in _state(env)["workloads"] if x["name"] == "hello-v1-1")
            return w if w["state"] == "ready" and w["app_pid"] != hello["app_pid"] else None

        w = eventually_sync(restarted, timeout=30, interval=0.2, what="hello-v1-1 restarted")
        assert w["containers"]["app"]["restarts"] == 1, w
        assert "earlier supervisor" in w["containers"]["app"]["last_exit"]["reason"]
    finally:
        state = _state(env)
        down = diktyo("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_gone(child_pids(state) + child_pids(before))
    assert _state(env) == {"running": False}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_down_stops_an_orphaned_mesh_from_the_state_file(
    tmp_path: Path, env: dict[str, str]
) -> None:
    proc, before = _up_foreground(tmp_path, env)
    pids = child_pids(before)
    assert len(pids) == 6
    proc.kill()
    proc.wait()
    assert all(pid_alive(p) for p in pids)  # the data plane outlives the supervisor
    down = diktyo("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopping its 3 apps, then its 3 sidecars" in down.stdout
    assert [p for p in pids if pid_alive(p)] == []
    assert _state(env) == {"running": False}
    assert not (Path(env["DIKTYO_HOME"]) / "mesh.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_keeper_of_a_detached_mesh_restarts_its_supervisor_under_load(
    tmp_path: Path, env: dict[str, str]
) -> None:
    before = _up(tmp_path, env)
    keeper = before["keeper_pid"]
    assert keeper and pid_alive(keeper)
    try:
        front = next(w for w in before["workloads"] if w["name"] == "front-v1-1")
        url = f"http://127.0.0.1:{front['app_ports']['9080']}/call/hello:9080/"
        with Traffic(url, rps=20) as traffic:
            time.sleep(1.5)  # real time: traffic flows before the kill
            _kill_supervisor(before)  # supervisor and control plane: gone

            def adopted() -> dict | None:  # the keeper starts a new supervisor, which adopts
                st = _state(env)
                return st if st.get("pid") != before["pid"] and st.get("state") == "ready" else None

            after = eventually_sync(adopted, timeout=60, interval=0.2, what="mesh adopted")
            _wait_synced(env, 3)
            time.sleep(2.0)  # real time: traffic keeps flowing after recovery
            # a loaded machine sends fewer than 20 rps: wait for the requests the count needs
            eventually_sync(lambda: traffic.ok >= 50, timeout=30, what=traffic.seen)
        assert traffic.failed == [], traffic.failed[:5]
        assert traffic.ok >= 50, traffic.ok
        assert after["control_plane"] == before["control_plane"]
        assert after["keeper_pid"] == keeper
        assert sorted(child_pids(after)) == sorted(child_pids(before))  # adopted, not restarted
        log = (Path(env["DIKTYO_HOME"]) / "mesh.log").read_text()
        assert f"keeper: the supervisor (pid {before['pid']}) was killed by SIGKILL" in log, log
        assert "adopting mesh 'survivor'" in log
    finally:
        state = _state(env)
        down = diktyo("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    # the adopting supervisor stopped the mesh in order (SIGTERM from both 'down' and the
    # keeper did not kill it halfway), nothing was left for 'down' to clean up
    assert "is gone; stopping its" not in down.stdout, down.stdout
    log = (Path(env["DIKTYO_HOME"]) / "mesh.log").read_text()
    assert log.rstrip().endswith("mesh stopped"), log[-1000:]
    assert_gone(child_pids(state) + child_pids(before) + [state["pid"], keeper])

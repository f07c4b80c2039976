"""Whole local mesh through the CLI with the real sidecar: up, traffic, apply, proxy-status, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from diktyo.platform.state import pid_alive
from diktyo.testing import eventually_sync

APPS = Path(__file__).parent / "apps"


def tiny_mesh(name: str, hello_versions: tuple[str, ...] = ("v1", "v2"), restart: str = "") -> str:
    """A mesh file: services hello and front, the tiny app as hello-<version>... and front-v1."""
    app = f'command: ["{{python}}", "{APPS / "tiny_app.py"}"]'
    workloads = [(f"hello-{v}", "hello", v) for v in hello_versions] + [("front-v1", "front", "v1")]
    return (
        f"name: {name}\n" + (f"restart: {restart}\n" if restart else "") + "services:\n"
        "  - name: hello\n    ports: [{name: http, port: 9080}]\n"
        "  - name: front\n    ports: [{name: http, port: 9080}]\n"
        "workloads:\n"
        + "".join(
            f"  - name: {w}\n    labels: {{app: {a}, version: {v}}}\n    {app}\n"
            for w, a, v in workloads
        )
    )


MESH = tiny_mesh("tiny")

ROUTE_V2 = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello}
spec:
  host: hello
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello}
spec:
  hosts: [hello]
  http:
  - route:
    - destination: {host: hello, subset: v2}
"""


def diktyo(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def get(url: str) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def child_pids(state: dict) -> list[int]:
    return [w[k] for w in state["workloads"] for k in ("sidecar_pid", "app_pid") if w.get(k)]


def assert_gone(pids: list[int], timeout: float = 5.0) -> None:
    """After 'diktyo down' (or Ctrl-C): every one of ``pids`` is gone (a zombie counts as gone;
    a process reparented to init may take a moment to be reaped on a loaded machine)."""

    def live() -> list[int]:
        return [p for p in pids if pid_alive(p)]

    eventually_sync(lambda: live() == [], timeout=timeout, what=lambda: f"{live()} gone")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    return {**os.environ, "DIKTYO_HOME": str(tmp_path / "home"), "NO_PROXY": "*"}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_up_detach_traffic_apply_down(tmp_path: Path, env: dict[str, str]) -> None:
    up = diktyo("up", "-f", str(tmp_path / "mesh.yaml"), "--detach", "--timeout", "45", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        st = diktyo("status", "-o", "json", env=env)
        state = json.loads(st.stdout)
        assert state["running"] and state["state"] == "ready"
        front = next(w for w in state["workloads"] if w["name"] == "front-v1-1")
        front_url = f"http://127.0.0.1:{front['app_ports']['9080']}"
        versions = set()
        for _ in range(10):
            code, body = get(front_url + "/call/hello:9080/")
            assert code == 200, body
            versions.add(json.loads(body)["version"])
        assert versions == {"v1", "v2"}

        (tmp_path / "v2.yaml").write_text(ROUTE_V2)
        # --wait: back once every sidecar ACKed the route; proxy-status right after a plain
        # apply can still show the previous version SYNCED while the push is debounced
        applied = diktyo("apply", "-f", str(tmp_path / "v2.yaml"), "--wait", env=env)
        assert applied.returncode == 0, applied.stderr
        assert "virtualservice/hello (default) applied" in applied.stdout
        assert "distributed to 3 of 3 sidecars" in applied.stdout, applied.stdout
        ps = diktyo("proxy-status", env=env)
        assert ps.returncode == 0 and ps.stdout.count("SYNCED") == 3, ps.stdout
        for _ in range(10):
            code, body = get(front_url + "/call/hello:9080/")
            assert code == 200 and json.loads(body)["version"] == "v2", body

        bad = diktyo("apply", "-f", str(tmp_path / "mesh.yaml"), env=env)  # not Istio YAML
        assert bad.returncode == 1 and "rejected" in bad.stderr
        code, body = get(front_url + "/call/hello:9080/")
        assert code == 200 and json.loads(body)["version"] == "v2"

        routes = diktyo("proxy-config", "front-v1-1", "routes", env=env)
        assert "outbound|9080|v2|hello.default.svc.cluster.local" in routes.stdout
    finally:
        state = json.loads(diktyo("status", "-o", "json", env=env).stdout)
        down = diktyo("down", env=env)
    assert down.returncode == 0, down.stderr
    pids = child_pids(state) + [state["pid"]]
    assert len(pids) == 7
    assert_gone(pids)
    assert json.loads(diktyo("status", "-o", "json", env=env).stdout) == {"running": False}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ctrl_c_stops_everything_in_order(tmp_path: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "diktyo.cli.main", "up", "-f", str(tmp_path / "mesh.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "ready" in line and line.startswith("mesh "):
                break
        text = "".join(lines)
        assert "starting 3 workloads (3 replicas)" in text, text
        assert "(3/3)" in text
        state = json.loads(diktyo("status", "-o", "json", env=env).stdout)
        pids = child_pids(state)
        assert len(pids) == 6
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping: apps, then sidecars, then the control plane" in out
    assert [p for p in pids if pid_alive(p)] == []


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_config_folder_is_watched_and_bad_files_keep_the_last_good_config(tmp_path: Path) -> None:
    from diktyo.platform.harness import MeshThread
    from diktyo.platform.mesh import load_mesh_text

    config = tmp_path / "config"
    config.mkdir()
    spec = load_mesh_text(MESH, "tiny.yaml", base_dir=str(tmp_path))
    with MeshThread(spec, config_dir=config) as mesh:
        front = next(w for w in mesh.describe()["workloads"] if w["name"] == "front-v1-1")
        front_url = f"http://127.0.0.1:{front['app_ports']['9080']}/call/hello:9080/"

        def versions(n: int = 6) -> set[str]:
            out = set()
            for _ in range(n):
                code, body = get(front_url)
                assert code == 200, body
                out.add(json.loads(body)["version"])
            return out

        def wait_for(expected: set[str]) -> None:
            eventually_sync(
                lambda: versions() == expected,
                timeout=15,
                interval=0.2,
                what=f"routing to {expected}",
            )

        (config / "route.yaml").write_text(ROUTE_V2)
        wait_for({"v2"})
        (config / "broken.yaml").write_text(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: x}\nspec: {hosts: [hello], htp: []}\n"
        )
        eventually_sync(
            lambda: mesh.mesh.cp.store.errors,  # type: ignore[union-attr]
            timeout=10,
            interval=0.1,
            what="broken.yaml rejected",
        )
        assert "broken.yaml" in mesh.mesh.cp.store.errors[0]  # type: ignore[union-attr]
        assert versions() == {"v2"}  # last good config still served
        (config / "broken.yaml").unlink()
        (config / "route.yaml").unlink()
        wait_for({"v1", "v2"})

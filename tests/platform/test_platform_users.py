"""Sidecars under their own uid, apart from the app's (diktyo running as root)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from diktyo.platform.mesh import load_mesh_text
from diktyo.platform.supervisor import LocalMesh, MeshStartError

ROOT = Path(__file__).resolve().parents[2]
TINY_APP = ROOT / "tests" / "e2e" / "apps" / "tiny_app.py"
SYSTEM_PYTHON = "/usr/bin/python3.11"  # the venv's interpreter may sit where other uids can't go
SIDECAR_UID, APP_UID = 1337, 1000  # Istio's proxy uid; an unprivileged app


def _runs_as(uid: int) -> bool:
    """Can ``uid`` run the sidecar from this tree with the system Python?"""
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        return False
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import diktyo.proxy, uvloop, httptools, msgspec"],
        user=uid,
        group=uid,
        extra_groups=[],
        env={"PYTHONPATH": _pythonpath()},
        cwd="/",
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def _pythonpath() -> str:
    site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)
    return os.pathsep.join([str(ROOT / "src"), str(site or "")])


MESH = f"""
name: uids
sidecar: {{runAsUser: {SIDECAR_UID}, runAsGroup: {SIDECAR_UID}}}
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
  - name: front
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello, version: v1}}
    runAsUser: {APP_UID}
    command: ["{SYSTEM_PYTHON}", "{TINY_APP}"]
  - name: front-v1
    labels: {{app: front, version: v1}}
    runAsUser: {APP_UID}
    command: ["{SYSTEM_PYTHON}", "{TINY_APP}"]
"""


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def system_python_sidecar(url: str, node: str, admin: int) -> list[str]:
    return [SYSTEM_PYTHON, "-m", "diktyo.cli.main", "sidecar", "--control-plane", url]  + [
        "--node", node, "--admin-port", str(admin)
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(
    not _runs_as(SIDECAR_UID),
    reason=f"needs root and {SYSTEM_PYTHON} able to import diktyo as uid {SIDECAR_UID}",
)
async def test_sidecars_run_under_their_own_uid_and_the_app_cannot_read_them(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    spec = load_mesh_text(MESH, "uids.yaml", base_dir="/")
    out = io.StringIO()
    mesh = LocalMesh(spec, sidecar_argv=system_python_sidecar, out=out, ready_timeout=30)
    try:
        await asyncio.wait_for(mesh.start(), 60)
        front, hello = mesh.replica("front-v1-1"), mesh.replica("hello-v1-1")
        for rep in (front, hello):
            assert rep.sidecar is not None and rep.app is not None
            assert _uid(rep.sidecar.pid) == SIDECAR_UID  # type: ignore[arg-type]
            assert _uid(rep.app.pid) == APP_UID  # type: ignore[arg-type]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            url = f"http://127.0.0.1:{front.app_ports[9080]}/call/hello:9080/"
            async with s.get(url) as r:
                assert r.status == 200, await r.text()
                assert json.loads(await r.read())["pod"] == "hello-v1-1"
        # the app's uid cannot read its sidecar's environment (bootstrap token) or memory
        peek = await asyncio.to_thread(
            subprocess.run,
            [SYSTEM_PYTHON, "-c", f"open('/proc/{hello.sidecar.pid}/environ').read()"],  # type: ignore[union-attr]
            user=APP_UID,
            group=APP_UID,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            check=False,
        )
        assert peek.returncode != 0 and "PermissionError" in peek.stderr, peek.stderr
    finally:
        print(out.getvalue())
        await asyncio.wait_for(mesh.stop(), 30)


async def test_run_as_user_without_root_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    spec = load_mesh_text(MESH, "uids.yaml", base_dir="/")
    mesh = LocalMesh(spec, out=io.StringIO())
    with pytest.raises(
        MeshStartError, match=r"sidecar.runAsUser/runAsGroup need diktyo to run as root"
    ):
        await mesh.start()
    await mesh.stop()


def test_uids_are_checked_when_loading() -> None:
    from diktyo.platform.mesh import MeshFileError

    with pytest.raises(MeshFileError, match="sidecar.runAsUser"):
        load_mesh_text("sidecar: {runAsUser: -1}\n", "m.yaml")
    assert load_mesh_text(MESH, "m.yaml").workloads[0].run_as_user == APP_UID


if __name__ == "__main__":  # pragma: no cover
    print(_runs_as(int(sys.argv[1]) if len(sys.argv) > 1 else SIDECAR_UID))

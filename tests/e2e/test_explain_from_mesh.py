"""``diktyo explain --from WORKLOAD`` asks the running mesh's control plane for that sidecar's
snapshot and runs the sidecar's real matcher on it.

On the shared Bookinfo mesh (``bookinfo_baseline``, tests/e2e/conftest.py): booting a mesh of
its own inside this test's timeout was the slowest part of it on a loaded machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.testing.controlplane import cli_env

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def explain(cp: str, *args: str, env: dict[str, str]) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "explain", "--control-plane", cp, "-o", "json", *args],
        env=env,
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_explain_from_a_running_sidecar(bookinfo_baseline: MeshThread, tmp_path: Path) -> None:
    mesh = bookinfo_baseline  # destination-rule-all; reviews' route is replaced below
    env = cli_env(mesh, tmp_path)  # the CLI sends the mesh's admin credential
    mesh.apply_file(NET / "virtual-service-reviews-test-v2.yaml")
    mesh.wait_synced()
    url = "http://reviews:9080/reviews/0"
    rc, jason = explain(
        mesh.url, "--from", "productpage-v1", "GET", url, "-H", "end-user: jason", env=env
    )
    assert rc == 0
    assert jason["virtualService"] == "default/reviews"
    assert jason["destination"]["subset"] == "v2"
    rc, other = explain(mesh.url, "--from", "productpage-v1", "GET", url, env=env)
    assert rc == 0 and other["destination"]["subset"] == "v1"
    assert other["rule"] != jason["rule"]
    proc = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "explain", "--control-plane", mesh.url,
         "--from", "nosuch", "GET", url],
        check=False, capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert proc.returncode == 1 and "no sidecar named 'nosuch'" in proc.stderr

"""CLI errors users see: a bad mesh file, no running mesh."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, home: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DIKTYO_HOME": home}
    env.pop("DIKTYO_CONTROL_PLANE", None)
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_up_with_a_bad_mesh_file_says_where(tmp_path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text("services:\n  - name: web\n    ports: [{name: http, port: 80}]\n    colour: red\n")
    r = _run("up", "-f", str(f), home=str(tmp_path))
    assert r.returncode == 2
    assert f"{f}:4:5: error: services[0].colour: unknown field 'colour'" in r.stderr
    assert "docs/mesh-file.md" in r.stderr


def test_commands_without_a_mesh_explain_how_to_start_one(tmp_path) -> None:
    r = _run("proxy-status", home=str(tmp_path))
    assert r.returncode == 1 and "diktyo up -f mesh.yaml --detach" in r.stderr
    r = _run("status", home=str(tmp_path))
    assert r.returncode == 3 and "no mesh is running" in r.stdout
    r = _run("down", home=str(tmp_path))
    assert r.returncode == 0 and "no mesh is running" in r.stdout

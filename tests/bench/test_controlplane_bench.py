"""Smoke test of ``bench/controlplane.py``: a few simulated sidecars long-poll the real control
plane, get the first snapshot, ACK it, then receive and ACK a config change. No speed asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_push_to_a_few_sidecars(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "controlplane.py"),
            "--sizes",
            "5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [js] = list(tmp_path.glob("*-controlplane-custom.json"))
    [run] = json.loads(js.read_text())["runs"]
    assert "error" not in run, run
    assert run["sidecars"] == 5
    assert run["snapshot_bytes"] > 1000
    assert 0 < run["receive_ms"]["first"] <= run["receive_ms"]["max"] <= run["all_acked_ms"]
    assert run["server_rss_mib"]["connected"] > 0
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert "| 5 |" in md

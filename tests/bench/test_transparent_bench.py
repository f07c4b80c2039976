"""Smoke test of ``bench/transparent.py``: two real local meshes (proxy and transparent
capture), wrk through both sidecars of each for a second; checks the JSON figures, not the
speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diktyo.platform.capture_netns import capture_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx")), reason="needs wrk, nginx")
@pytest.mark.skipif(
    capture_unavailable_reason() is not None,
    reason=f"transparent mode unavailable: {capture_unavailable_reason()}",
)
def test_transparent_bench_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "transparent.py"),
            "--smoke",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=140,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    [js] = list(tmp_path.glob("*-transparent-smoke.json"))
    res = json.loads(js.read_text())
    assert set(res["summary"]) == {"proxy -c50", "transparent -c50"}
    # each path was proven to cross the server sidecar before it was measured
    assert res["checks"]["proxy"] >= 10 and res["checks"]["transparent"] >= 10
    for row in res["summary"].values():
        assert row["rps"] > 0 and row["cpu_us_per_req"] > 0
    assert all(s["errors"] == 0 for s in res["samples"])
    assert 0 < res["original_dst"]["so_original_dst_us"] < 1000
    assert "ratio transparent / proxy" in next(tmp_path.glob("*-transparent-smoke.md")).read_text()

"""Smoke test of the benchmark harness: ``bench/run.py --smoke`` runs every scenario for about a
second against direct and nginx, and writes JSON and Markdown with the expected fields.
No speed assertions: benchmarks measure speed, tests check the harness works."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("nginx", "wrk", "haproxy", "taskset")),
    reason="needs nginx, haproxy, wrk and taskset: apt-get install nginx haproxy wrk util-linux",
)


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_smoke_run_writes_results(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [js] = list(tmp_path.glob("*-smoke.json"))
    result = json.loads(js.read_text())
    assert result["mode"] == "smoke"
    assert result["targets"] == ["direct", "nginx"]
    assert not result["failures"]
    for key in ("python", "uvloop", "nginx", "haproxy", "wrk"):
        assert result["machine"][key], key
    has_cc = shutil.which("gcc") or shutil.which("cc")
    expected = {"sat-c1-small", "sat-c1-1k", "sat-c50-small", "sat-c50-1k"}
    if has_cc:
        expected |= {"rate-1000", "rate-5000"}
    for target in ("direct", "nginx"):
        assert set(result["runs"][target]) == expected
        for scenario, reps in result["runs"][target].items():
            [res] = reps
            assert "error" not in res, (target, scenario, res)
            assert res["requests"] > 0 and res["rps"] > 0
            assert res["error_count"] == 0, (target, scenario, res)
            for p in ("p50", "p90", "p99", "p999"):
                assert res["latency_us"][p] >= 0
            assert res["latency_us"]["p50"] <= res["latency_us"]["p999"]
            if target == "nginx":
                assert res["cpu_us_per_req"] is not None and res["cpu_us_per_req"] >= 0
            else:
                assert res["cpu_us_per_req"] is None
    assert result["memory"]["nginx"]["idle_rss_kib"][0] > 0
    assert (
        result["memory"]["nginx"]["peak_rss_kib"][0] >= result["memory"]["nginx"]["idle_rss_kib"][0]
    )
    summary = result["summary"]
    assert summary["targets"]["nginx"]["sat-c50-small"]["added_p50"] is not None
    assert set(summary["goals"]) == {
        "sat_rps_vs_haproxy",
        "sat_capacity_vs_haproxy",
        "cpu_at_1000",
        "mesh_added_p99",
        "idle_rss",
    }
    # no diktyo or HAProxy in a smoke run: the targets are reported as not measured
    assert all(g["met"] is None for g in summary["goals"].values())
    md = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert "| sat-c50-small | nginx |" in md
    assert (tmp_path / "latest.md").read_text() == md


def test_unknown_target_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--smoke",
            "--targets",
            "envoy",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2
    assert "unknown target 'envoy'" in out.stderr

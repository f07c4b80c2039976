"""Smoke test of ``bench/h2bench.py``: every target answers h2load over h2c (one short
repetition each) and the report has a row per target. No speed asserts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_h2bench_smoke() -> None:
    missing = [t for t in ("h2load", "nginx", "haproxy", "taskset") if not shutil.which(t)]
    if missing:
        pytest.skip(
            f"needs Debian packages for {', '.join(missing)} (nghttp2-client nginx haproxy)"
        )
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "h2bench.py"), "--smoke",
         "--targets", "direct,diktyo,haproxy,nginx"],
        capture_output=True, text=True, check=False, timeout=170,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert {r["target"] for r in rows} == {"direct", "diktyo", "haproxy", "nginx"}
    for r in rows:
        assert r["ok"] > 0 and r["failed"] == 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0
    assert "| diktyo |" in out.stdout and "diktyo / HAProxy" in out.stdout

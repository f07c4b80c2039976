"""Smoke test of ``bench/mtls.py``: a real local mesh, wrk through both sidecars with and
without mTLS and connection reuse for a second each; checks the JSON figures, not the speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(110)
@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx")), reason="needs wrk, nginx")
def test_mtls_bench_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mtls.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    [js] = list(tmp_path.glob("*-mtls-smoke.json"))
    [md] = list(tmp_path.glob("*-mtls-smoke.md"))
    res = json.loads(js.read_text())
    assert set(res["summary"]) == {"mtls/c50", "plain/c50", "mtls-noreuse/c50", "plain-noreuse/c50"}
    # the server sidecar saw mutual TLS only where the DestinationRule leaves auto mTLS on
    assert res["security_policy_seen"]["mtls"] == "mutual_tls"
    assert res["security_policy_seen"]["mtls-noreuse"] == "mutual_tls"
    assert res["security_policy_seen"]["plain"] == "none"
    assert res["security_policy_seen"]["plain-noreuse"] == "none"
    for key, row in res["summary"].items():
        # share of the measured requests the server sidecar counted as mutual TLS
        assert row["mtls_share"] == (1.0 if key.startswith("mtls") else 0.0), (key, row)
        assert row["rps"] > 0 and row["errors"] == 0, (key, row)
        assert row["cpu_us_per_req_client"] > 0 and row["sched_us_per_req_server"] > 0, (key, row)
        assert 0 < row["p50_us"] <= row["p99_us"], (key, row)
    assert "mtls/c50 vs plain/c50" in res["ratios"]
    assert res["ratios"]["mtls/c50 vs plain/c50"]["cpu_us_per_req"] > 0
    assert "| mtls-noreuse | 50 |" in md.read_text()
    # one inbound handshake per request without reuse, and sidecars resume TLS sessions
    noreuse = res["summary"]["mtls-noreuse/c50"]
    assert noreuse["handshakes_per_req"] > 0.5 and noreuse["resumed_share"] > 0, noreuse
    assert res["summary"]["plain-noreuse/c50"]["handshakes_per_req"] == 0

"""``diktyo demo`` starts Bookinfo, applies the default routing, sends traffic and stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_demo_serves_the_product_page(tmp_path) -> None:
    env = {**os.environ, "DIKTYO_HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "demo",
            "--port",
            "0",
            "--requests",
            "5",
            "--exit-after-traffic",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "virtual-service-all-v1.yaml (4 resources)" in out
    assert "/productpage (200: 5)" in out
    assert "dashboard:    http://127.0.0.1:" in out
    # the admin credential: created private in DIKTYO_HOME, carried by the dashboard link
    token_file = tmp_path / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert f"/?token={token_file.read_text().strip()}" in out
    assert "[reviews-v1-1] " in out and "mesh stopped" in out
    assert not (tmp_path / "mesh.json").exists()

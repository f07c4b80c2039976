"""`diktyo control-plane --store`: bad store URLs and an unreachable etcd are clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diktyo.cli.main import main


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("redis://127.0.0.1:6379", "use 'embedded' (the default) or etcd://HOST:PORT"),
        ("etcd://nohost", "bad etcd endpoint 'nohost'"),
        ("etcd://", "no etcd endpoint"),
    ],
)
def test_bad_store_urls(store: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["control-plane", "--port", "0", "--store", store]) == 2
    assert expected in capsys.readouterr().err


def test_unreachable_etcd_exits_1_naming_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "control-plane", "--port", "0",
         "--store", "etcd://127.0.0.1:9", "--store-key-file", str(tmp_path / "k")],
        check=False, capture_output=True, text=True, timeout=60,
        env={"DIKTYO_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "etcd at http://127.0.0.1:9 is not answering" in proc.stderr
    assert "start etcd first, or check the --store URL" in proc.stderr

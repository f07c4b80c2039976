"""Smoke test of ``bench/idlerss.py``: two variants (compiled, pure) of the bench's sidecar,
one start each, alternated; each gets a row with its RSS and time to ready, and the admin
``/memory`` report shows no optional library loaded (the bench config's regex stays
uncompiled while idle). No RSS or speed asserts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_idlerss_smoke() -> None:
    missing = [t for t in ("nginx", "taskset") if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages nginx, util-linux)")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idlerss.py"), "--reps", "1", "--settle", "0.2",
         "--modules", "--variant", "compiled", "--variant", "pure:DIKTYO_PURE=1"],
        capture_output=True, text=True, check=False, timeout=170,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("compiled", "pure"):
        assert f"{name}: modules " in out.stdout, out.stdout
        m = re.search(
            rf"{name}: median +([\d.]+) MiB = ([\d.]+) MB .*ready after ([\d.]+) s", out.stdout
        )
        assert m is not None, out.stdout
        assert float(m.group(1)) > 1 and float(m.group(3)) > 0
    assert out.stdout.count("optional []") == 2, out.stdout

"""Under ``--dist loadgroup`` each module (and each named group of tests/conftest.py) runs on
one worker: module-scoped fixtures are built once and the ``host`` / ``etcd`` groups never run
two of their modules at once. pytest 9.2 silently broke xdist's own grouping (every test became
a group of its own); tests/conftest.py's scheduler takes the groups from the paths instead."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# two modules of pure tests (no ports, files or processes: nothing another run can race)
MODULES = ("tests/api/test_api_limits.py", "tests/repo/test_no_sync_sleeps.py")


@pytest.mark.slow  # a pytest run of its own (8 s): in `make test`, not the fast tier
@pytest.mark.timeout(120)
def test_a_module_runs_on_one_worker() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
         "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder", "-v", *MODULES],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, module in re.findall(r"\[(gw\d+)\] \[\s*\d+%\] PASSED (\S+?)::", out.stdout):
        workers[module].add(worker)
    assert set(workers) == set(MODULES), out.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), dict(workers)

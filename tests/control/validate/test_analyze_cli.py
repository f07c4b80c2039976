"""``diktyo analyze`` end to end: real process, exit codes, text and JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
NET = REPO / "samples" / "bookinfo" / "networking"


def diktyo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "analyze", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_clean_files_exit_0() -> None:
    proc = diktyo(
        str(NET / "virtual-service-all-v1.yaml"),
        str(NET / "destination-rule-all.yaml"),
        "--bookinfo",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "No validation issues found in 8 resource(s) from 2 file(s)" in proc.stderr


def test_errors_exit_1_with_file_line_col(tmp_path: Path) -> None:
    bad = tmp_path / "vs.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\n"
        "spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n"
        "        subset: v2\n    timout: 1s\n"
    )
    proc = diktyo(str(bad))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        (
            f"{bad}:12:5: error: spec.http[0].timout: unknown field 'timout' "
            "(hint: did you mean 'timeout'?)"
        )
    ]
    assert "1 error(s), 0 warning(s)" in proc.stderr


def test_warnings_alone_exit_0_and_json(tmp_path: Path) -> None:
    f = tmp_path / "vs.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n"
        "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviewz}\n"
    )
    proc = diktyo(str(f), "--host", "reviews", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)
    assert item == {
        "file": str(f),
        "line": 8,
        "column": 21,
        "severity": "warning",
        "field": "spec.http[0].route[0].destination.host",
        "message": "VirtualService r: host 'reviewz' (reviewz.default.svc.cluster.local) "
        "not found in the registry",
        "hint": "check the spelling or add a ServiceEntry for it",
    }


def test_cross_resource_error_in_json_exits_1() -> None:
    proc = diktyo(str(NET / "virtual-service-reviews-v3.yaml"), "-o", "json")
    assert proc.returncode == 1
    (item,) = json.loads(proc.stdout)
    assert item["severity"] == "error" and item["field"].endswith(".subset")
    assert item["line"] == 13


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    proc = diktyo(str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1
    assert "cannot read file" in proc.stdout and "Paths not found" in proc.stderr


def test_help_describes_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "analyze", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "Exit status" in proc.stdout

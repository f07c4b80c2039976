"""``diktyo analyze`` end to end: istioctl's exit codes, text/JSON/YAML output.

Most cases call the command's ``main(argv)`` in this process (same parser, same code, same
output; a new interpreter costs ~1 s of CPU per call); the first and the ``--help`` case run
a real ``python -m diktyo.cli.main`` process, so the exit status through the interpreter and
the module entry point stay covered.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from diktyo.cli.main import main

REPO = Path(__file__).resolve().parents[3]
NET = REPO / "samples" / "bookinfo" / "networking"


def diktyo(*args: str) -> subprocess.CompletedProcess[str]:
    """``diktyo analyze ARGS`` in this process: exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(["analyze", *args])
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["diktyo", "analyze", *args], code, out.getvalue(),
                                       err.getvalue())  # fmt: skip


def diktyo_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "analyze", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_clean_files_exit_0() -> None:
    proc = diktyo_process(
        str(NET / "virtual-service-all-v1.yaml"),
        str(NET / "destination-rule-all.yaml"),
        "--bookinfo",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "No validation issues found when analyzing 8 resource(s) from 2 file(s)" in proc.stderr


def test_schema_error_exits_79_with_istioctl_line(tmp_path: Path) -> None:
    bad = tmp_path / "vs.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\n"
        "spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n"
        "        subset: v2\n    timout: 1s\n"
    )
    proc = diktyo(str(bad))
    assert proc.returncode == 79
    assert proc.stdout.splitlines() == [
        (
            f"Error [IST0106] (VirtualService default/reviews {bad}:12:5) Schema validation "
            "error: spec.http[0].timout: "
            "unknown field 'timout' (hint: did you mean 'timeout'?)"
        )
    ]
    assert "1 error(s), 0 warning(s)" in proc.stderr and "Analyzers found issues" in proc.stderr


def test_reference_not_found_text_json_and_yaml(tmp_path: Path) -> None:
    f = tmp_path / "vs.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n"
        "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviewz}\n"
    )
    proc = diktyo(str(f), "--host", "reviews")
    assert proc.returncode == 79
    assert proc.stdout.splitlines() == [
        (
            f"Error [IST0101] (VirtualService default/r {f}:8:21) Referenced host not found: "
            "\"reviewz\" (hint: did you mean 'reviews'?)"
        )
    ]
    expected = {
        "code": "IST0101",
        "level": "Error",
        "origin": "VirtualService default/r",
        "reference": f"{f}:8:21",
        "message": 'Referenced host not found: "reviewz"',
        "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0101/"
        "?ref=diktyo-analyze",
        "name": "ReferencedResourceNotFound",
        "file": str(f),
        "line": 8,
        "column": 21,
        "severity": "error",
        "field": "spec.http[0].route[0].destination.host",
        "hint": "did you mean 'reviews'?",
    }
    proc = diktyo(str(f), "--host", "reviews", "-o", "json")
    assert proc.returncode == 0, proc.stderr  # istioctl: -o json never fails on findings
    assert json.loads(proc.stdout) == [expected]
    proc = diktyo(str(f), "--host", "reviews", "-o", "yaml")
    assert proc.returncode == 0, proc.stderr
    from ruamel.yaml import YAML

    assert YAML(typ="safe").load(proc.stdout) == [expected]


def test_warnings_alone_exit_0_unless_the_threshold_says_so(tmp_path: Path) -> None:
    f = tmp_path / "se.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n"
        "  hosts: [db.example.com]\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n"
    )
    proc = diktyo(str(f))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("Warning [IST0134] (ServiceEntry default/db ")
    assert diktyo(str(f), "--failure-threshold", "Warning").returncode == 79
    quiet = diktyo(str(f), "--output-threshold", "Error")
    assert quiet.returncode == 0 and quiet.stdout == ""
    gone = diktyo(str(f), "-S", "IST0134=ServiceEntry default/*", "--failure-threshold", "Info")
    assert gone.returncode == 0 and gone.stdout == ""
    # istioctl's 'Kind name.namespace' form works too
    assert diktyo(str(f), "-S", "IST0134=ServiceEntry db.default").stdout == ""


def test_cross_resource_error_in_json() -> None:
    proc = diktyo(str(NET / "virtual-service-reviews-v3.yaml"), "-o", "json")
    assert proc.returncode == 0
    (item,) = json.loads(proc.stdout)
    assert (item["code"], item["level"]) == ("IST0101", "Error")
    assert item["field"].endswith(".subset") and item["line"] == 13
    assert item["message"] == 'Referenced host+subset in destinationrule not found: "reviews+v3"'


def test_unparseable_file_exits_65(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: [VirtualService\n")
    proc = diktyo(str(f))
    assert proc.returncode == 65, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"Error [DKT0001] ({f}:")
    assert "YAML syntax error" in proc.stdout


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    proc = diktyo(str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1
    assert f"stat {tmp_path / 'nope.yaml'}: no such file or directory" in proc.stderr


def test_list_analyzers_and_help() -> None:
    proc = diktyo("-L")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert "IST0109 Error   ConflictingMeshGatewayVirtualServiceHosts: " in "\n".join(lines)
    assert any(line.startswith("DKT0101 Error   DuplicateResource") for line in lines)
    proc = subprocess.run(
        [sys.executable, "-m", "diktyo.cli.main", "analyze", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "Exit status" in proc.stdout and "79" in proc.stdout

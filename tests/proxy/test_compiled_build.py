"""Which build of the hot path runs (mypyc-compiled or pure Python), and that a developer never
silently runs a stale compiled module (src/diktyo/_build.py, setup.py).

CI sets DIKTYO_EXPECT_COMPILED=1 (.ci/run installs gcc and Python's headers), so there a
missing compiled build fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diktyo
from diktyo import _build

PKG = Path(diktyo.__file__).resolve().parent
PROBE = (
    "import json, diktyo._build as b\n"
    "import diktyo.proxy.codec.http1, diktyo.proxy.http.connection_manager, diktyo.proxy.stats\n"
    "print(json.dumps(b.status()))\n"
)


def run_probe(env_extra: dict[str, str], pythonpath: Path | None = None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != _build.PURE_ENV}
    env.update(env_extra)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout), out.stderr


def compiled_build_present() -> bool:
    ok, _, _ = _build.check(str(PKG))
    if not ok and os.environ.get("DIKTYO_EXPECT_COMPILED") == "1":
        pytest.fail(
            f"DIKTYO_EXPECT_COMPILED=1 but no usable compiled build: {_build.check(str(PKG))[1]}"
        )
    return ok


def version_line(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != _build.PURE_ENV}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", "from diktyo.cli.main import main; main(['--version'])"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return out.stdout.replace("\n", " ")


def test_pure_switch_loads_the_py_sources() -> None:
    status, err = run_probe({_build.PURE_ENV: "1"})
    assert status["compiled"] is False
    assert "DIKTYO_PURE=1" in status["reason"]
    assert len(status["loaded"]) >= 3
    assert all(f.endswith(".py") for f in status["loaded"].values()), status["loaded"]
    assert "stale" not in err
    assert "compiled: no (DIKTYO_PURE=1" in version_line({_build.PURE_ENV: "1"})


def test_compiled_build_is_what_runs_by_default() -> None:
    if not compiled_build_present():
        pytest.skip(f"no compiled build here: {_build.check(str(PKG))[1]}")
    status, err = run_probe({})
    assert status["compiled"] is True, status
    assert all(f.endswith(".so") for f in status["loaded"].values()), status["loaded"]
    assert err == ""
    assert "compiled: yes (compiled with mypyc" in version_line({})


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the installed package (mtimes kept) with its mypyc group library."""
    if not compiled_build_present():
        pytest.skip(f"no compiled build here: {_build.check(str(PKG))[1]}")
    shutil.copytree(PKG, tmp_path / "diktyo", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in PKG.parent.glob("diktyo_hotpath__mypyc*"):
        shutil.copy2(lib, tmp_path / lib.name)
    return tmp_path


def test_an_edited_source_runs_pure_and_says_so(package_copy: Path) -> None:
    status, err = run_probe({}, package_copy)
    assert status["compiled"] is True and err == ""  # the untouched copy runs compiled
    src = package_copy / "diktyo" / "proxy" / "codec" / "http1.py"
    with src.open("a") as f:
        f.write("\nEDITED_AFTER_THE_BUILD = True\n")
    status, err = run_probe({}, package_copy)
    assert status["compiled"] is False
    assert all(f.endswith(".py") for f in status["loaded"].values()), status["loaded"]
    assert "compiled build is stale: diktyo/proxy/codec/http1.py changed" in err
    assert "make build" in err


def test_a_touched_but_unchanged_source_stays_compiled(package_copy: Path) -> None:
    src = package_copy / "diktyo" / "proxy" / "stats.py"
    os.utime(src, ns=(0, src.stat().st_mtime_ns + 5_000_000_000))  # e.g. a git checkout
    status, err = run_probe({}, package_copy)
    assert status["compiled"] is True
    assert err == ""


def fake_build(tmp_path: Path, modules: list[str]) -> Path:
    pkg = tmp_path / "diktyo"
    recs = {}
    for m in modules:
        py = Path(_build.source_path(m, str(pkg)))
        py.parent.mkdir(parents=True, exist_ok=True)
        py.write_text(f"# {m}\n")
        Path(str(py)[:-3] + ".cpython-311-x86_64-linux-gnu.so").write_bytes(b"not really")
        recs[m] = _build.file_record(str(py))
    (pkg / _build.BUILD_INFO).write_text(json.dumps({"compiler": "mypyc test", "modules": recs}))
    return pkg


def test_check_finds_stale_incomplete_and_unrecorded_builds(tmp_path: Path) -> None:
    mods = ["diktyo.proxy.a", "diktyo.proxy.b"]
    pkg = fake_build(tmp_path, mods)
    assert _build.check(str(pkg), mods) == (True, "compiled with mypyc test", False)
    Path(_build.source_path(mods[1], str(pkg))).write_text("# edited, same size?\n")
    ok, why, warn = _build.check(str(pkg), mods)
    assert (ok, warn) == (False, True) and "stale: diktyo/proxy/b.py" in why
    pkg = fake_build(tmp_path / "2", mods)
    next(pkg.glob("proxy/a.cpython*.so")).unlink()
    ok, why, warn = _build.check(str(pkg), mods)
    assert (ok, warn) == (False, True) and "incomplete" in why and "diktyo.proxy.a" in why
    pkg = fake_build(tmp_path / "3", mods)
    (pkg / _build.BUILD_INFO).unlink()
    ok, why, warn = _build.check(str(pkg), mods)
    assert (ok, warn) == (False, True) and "no build record" in why


def test_a_pure_install_says_why_without_warning(tmp_path: Path) -> None:
    pkg = tmp_path / "diktyo"
    pkg.mkdir()
    (pkg / _build.BUILD_INFO).write_text(
        json.dumps(
            {"compiled": False, "reason": "pure-Python install: no C compiler ('cc' not found)"}
        )
    )
    assert _build.check(str(pkg)) == (
        False,
        "pure-Python install: no C compiler ('cc' not found)",
        False,
    )


@pytest.mark.parametrize("pure", ["1", "0"])
async def test_the_sidecars_ready_line_says_which_build_serves(tmp_path: Path, pure: str) -> None:
    import asyncio

    from diktyo.testing import FakeUpstream, http_request, static_service_entry

    expect = pure == "0" and compiled_build_present()
    env = {**os.environ, _build.PURE_ENV: pure}
    async with FakeUpstream() as app:
        (tmp_path / "mesh.yaml").write_text(static_service_entry("reviews", app.port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.proxy", "--config", str(tmp_path), "--outbound-port",
            "0", "--admin-port", "0", stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert ready["event"] == "ready"
            assert ready["compiled"] is expect
            r = await http_request(ready["listeners"]["outbound"], "GET", "http://reviews:9080/")
            assert r.status == 200  # and that build serves
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)

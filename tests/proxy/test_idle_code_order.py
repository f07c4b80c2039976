"""The compiled hot path lays out what an idle sidecar runs in one place (setup.py's
``order_idle_code``, ``diktyo/_idle_order.py``; issue 11, idle RSS): the kernel maps a file's
pages 64 KiB around every page touched, so idle code scattered over the library keeps all
of it resident."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

import diktyo
from diktyo import _build
from diktyo._idle_order import IDLE_FUNCTIONS

SRC = Path(diktyo.__file__).resolve().parent.parent


def group_library() -> Path:
    ok, why, _ = _build.check(str(SRC / "diktyo"))
    if not ok:
        pytest.skip(f"no compiled build: {why}")
    libs = sorted(SRC.glob("diktyo_hotpath__mypyc*.so"))
    if not libs:
        pytest.skip("the compiled build's group library is not beside the package")
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not installed")
    return libs[0]


def text_symbols(lib: Path) -> list[str]:
    """The library's function symbols in address order."""
    out = subprocess.run(["nm", "-n", str(lib)], capture_output=True, text=True, check=True)
    return [p[2] for p in (line.split() for line in out.stdout.splitlines())
            if len(p) == 3 and p[1] in "tT"]  # fmt: skip


def test_the_idle_list_names_the_libraries_functions() -> None:
    """A list gone stale (hot-path functions renamed) only costs RSS, but should be noticed:
    regenerate it with ``bench/idleorder.py``."""
    names = set(text_symbols(group_library()))
    listed = set(IDLE_FUNCTIONS)
    missing = sorted(listed - names)
    assert len(missing) <= len(listed) // 5, (
        f"{len(missing)} of the {len(listed)} functions in diktyo/_idle_order.py are not in the "
        f"compiled library (e.g. {missing[:5]}): run bench/idleorder.py, then make build"
    )


def test_idle_functions_are_laid_out_together() -> None:
    lib = group_library()
    if shutil.which("ld.gold") is None:  # the build machine is this one (setup.py)
        pytest.skip("no ld.gold (binutils): setup.py links the idle code unordered")
    symbols = text_symbols(lib)
    listed = set(IDLE_FUNCTIONS)
    where = [i for i, name in enumerate(symbols) if name in listed]
    assert where, "none of the idle functions is in the library"
    between = [n for n in symbols[where[0] : where[-1] + 1] if n not in listed]
    # a few static helpers gcc split off or renamed may sit among them; not hundreds
    assert len(between) <= 10, (
        f"{len(between)} functions an idle sidecar does not run sit among the {len(where)} "
        f"it runs (e.g. {between[:5]}): the library was not linked in idle order"
    )


def test_a_new_idle_order_relinks_the_group_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order file is a dependency of the group's extension: build_ext links only when a
    source or dependency is newer than the library, and a new order leaves mypyc's C files
    unchanged, so without it ``make build`` kept the old layout (stop 20)."""
    setup_py = SRC.parent / "setup.py"
    if not setup_py.exists():
        pytest.skip("not a source tree (no setup.py beside src/)")
    if shutil.which("ld.gold") is None:
        pytest.skip("no ld.gold (binutils): setup.py links the idle code unordered")
    import setuptools
    from setuptools import Extension

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)  # its definitions, no build
    monkeypatch.chdir(os.getcwd())  # setup.py changes to the tree; put the directory back
    ns = runpy.run_path(str(setup_py), run_name="setup_under_test")
    group = Extension("diktyo_hotpath__mypyc", ["group.c"])
    other = Extension("diktyo.proxy.codec._nghttp2_api", ["api.c"])
    ns["order_idle_code"]([group, other])
    order = ns["ROOT"] / "build" / "idle-sections.txt"
    assert str(order) in group.depends
    assert other.depends == []
    assert f"-Wl,--section-ordering-file={order}" in group.extra_link_args
    assert ".text." + IDLE_FUNCTIONS[0] in order.read_text().splitlines()


def _setup_namespace(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    setup_py = SRC.parent / "setup.py"
    if not setup_py.exists():
        pytest.skip("not a source tree (no setup.py beside src/)")
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)  # its definitions, no build
    monkeypatch.chdir(os.getcwd())  # setup.py changes to the tree; put the directory back
    return runpy.run_path(str(setup_py), run_name="setup_under_test")


def _build_toy(
    ns: dict[str, object], tmp_path: Path, c_source: str, link_args: list[str]
) -> tuple[object, str]:
    """Runs setup.py's ``BuildHotPath`` on one small C extension (instead of the mypyc group)
    into ``tmp_path``; returns the command and what the build said on stderr."""
    import contextlib
    import io

    from setuptools import Distribution, Extension

    if ns["why_no_compiler"]() is not None:  # type: ignore[operator]
        pytest.skip(f"no C toolchain: {ns['why_no_compiler']()}")  # type: ignore[operator]
    (tmp_path / "toy.c").write_text(c_source)
    toy = Extension("toyext", [str(tmp_path / "toy.c")], extra_link_args=link_args)
    base: type = ns["BuildHotPath"]  # type: ignore[assignment]

    class ToyBuild(base):  # type: ignore[misc, valid-type]
        def plan(self) -> None:
            self.distribution.ext_modules = [toy]
            self.nghttp2_ext = None

    cmd = ToyBuild(Distribution({"name": "toy", "ext_modules": [toy]}))
    cmd.build_lib = str(tmp_path / "lib")
    cmd.build_temp = str(tmp_path / "tmp")
    cmd.ensure_finalized()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        cmd.run()
    return cmd, err.getvalue()


TOY_C = """#include <Python.h>
static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "toyext", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_toyext(void) { return PyModule_Create(&m); }
"""


def test_a_link_refusing_the_idle_order_is_retried_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A linker that refuses the ordering flags (no gold, an unreadable order file) links the
    library again without them instead of installing pure Python. Stop 20's bug: the retry
    called ``build_ext.run()`` a second time, which always failed."""
    ns = _setup_namespace(monkeypatch)
    bad_order = f"{ns['IDLE_ORDER_FLAGS'][2]}{tmp_path / 'missing' / 'order.txt'}"  # type: ignore[index]
    cmd, said = _build_toy(ns, tmp_path, TOY_C, [bad_order])
    assert "linking with the idle-code ordering failed" in said, said
    assert cmd.reason is None, cmd.reason  # type: ignore[attr-defined]
    built = list((tmp_path / "lib").glob("toyext*.so"))
    assert built, said
    info = json.loads((tmp_path / "lib" / "diktyo" / _build.BUILD_INFO).read_text())
    assert info["compiled"] is True, info


def test_a_failed_compile_installs_pure_python_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ns = _setup_namespace(monkeypatch)
    cmd, said = _build_toy(ns, tmp_path, TOY_C + "this is not C;\n", [])
    assert "NOT compiling the hot path: the C build failed" in said, said
    assert not list((tmp_path / "lib").glob("toyext*.so"))
    info = json.loads((tmp_path / "lib" / "diktyo" / _build.BUILD_INFO).read_text())
    assert info["compiled"] is False and "the C build failed" in info["reason"], info

"""Builds the sidecar's hot path with mypyc (docs/decisions.md, "Compiled hot path").

``pip install .`` and ``pip install -e .`` compile the modules listed in
``src/diktyo/_build.py`` (HOT_PATH) into one mypyc group. The ``.py`` sources stay: they are
what runs with ``DIKTYO_PURE=1`` or when a compiled module is stale (``diktyo/_build.py``).

Without a C compiler or Python's headers (or with ``DIKTYO_PURE=1`` set while installing) the
install still succeeds, pure Python, and says so; ``diktyo --version`` tells which build runs.
Everything else about the package is in ``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
os.chdir(ROOT)  # mypyc takes the sources and writes its C files relative to here
BUILD = runpy.run_path(str(ROOT / "src" / "diktyo" / "_build.py"))  # stdlib only
HOT_PATH: tuple[str, ...] = BUILD["HOT_PATH"]
# the HTTP/2 codec's C side on libnghttp2 (cffi API mode; optional: without it the codec runs
# cffi's ABI mode): built with the hot path, its own failure only costs itself
NGHTTP2 = runpy.run_path(str(ROOT / "src" / "diktyo" / "proxy" / "codec" / "_nghttp2_build.py"))
# placeholder until build_ext runs: mypyc type-checks the whole group, which takes a while, so
# it runs only when extensions are really built (not for egg_info, sdist, ...)
PLACEHOLDER = "diktyo._hotpath_placeholder"
# mypy settings for the build: the project's own (pyproject.toml, --strict) assume the runtime
# dependencies are installed, which an isolated build environment does not have; the type
# checking proper is `make lint`'s job. Third-party types become Any: mypyc calls them through
# the generic C API either way.
MYPY_FLAGS = [
    "--config-file=",
    "--python-version=3.11",
    "--ignore-missing-imports",
    "--follow-imports=silent",
    "--disable-error-code=misc",  # the matcher's bound-default lambdas (pyproject override)
]


def say(msg: str) -> None:
    print(f"diktyo build: {msg}", file=sys.stderr, flush=True)


def why_no_compiler() -> str | None:
    """Why a C extension cannot be built here, or None when it can."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    cc = os.environ.get("CC", cc).split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc!r} not found)"
    include = sysconfig.get_paths().get("include", "")
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h missing)"
    return None


def remove_compiled(root: str) -> None:
    """Deletes the hot path's extension files under ``root`` (a dir holding ``diktyo/``)."""
    pkg = os.path.join(root, "diktyo")
    libs = [str(p) for p in Path(root).glob("diktyo_hotpath__mypyc*")]
    libs += [str(p) for p in Path(root, "diktyo", "proxy", "codec").glob("_nghttp2_api.*")]
    for path in [*(BUILD["compiled_path"](m, pkg) for m in HOT_PATH), *libs]:
        if path and os.path.exists(path):
            os.unlink(path)
            say(f"removed {path} (an earlier compiled build)")


def remove_strays(root: str) -> None:
    """Deletes compiled modules under ``root/diktyo`` that are no longer in HOT_PATH: they
    would shadow their ``.py`` and link against a group library that no longer has them."""
    for so in Path(root, "diktyo").rglob("*.so"):
        rel = so.relative_to(root)
        module = ".".join([*rel.parts[:-1], so.name.split(".")[0]])
        if module not in HOT_PATH and module != NGHTTP2["MODULE"]:
            so.unlink()
            say(f"removed {so} ({module} is no longer compiled)")


IDLE_ORDER_FLAGS = ("-ffunction-sections", "-fuse-ld=gold", "-Wl,--section-ordering-file=")


def order_idle_code(exts: list[Extension]) -> None:
    """Lays out the group library's text with what an idle sidecar runs first (issue 11).

    The kernel maps a file's cached pages around every page a process touches (fault-around,
    64 KiB), so a start-up that runs 330 functions scattered over 1.5 MiB of code leaves nearly
    all of it resident. With one section per function and gold's ``--section-ordering-file``
    listing the functions of ``diktyo/_idle_order.py`` (what a sidecar runs from start to
    idle), those sit together and the rest stays unmapped until a request needs it. Without
    ``ld.gold`` the library links as before."""
    if shutil.which("ld.gold") is None:
        say("ld.gold not found: the hot path links without its idle-code ordering")
        return
    names = runpy.run_path(str(ROOT / "src" / "diktyo" / "_idle_order.py"))["IDLE_FUNCTIONS"]
    path = ROOT / "build" / "idle-sections.txt"
    path.parent.mkdir(exist_ok=True)
    text = "".join(f".text.{n}\n.text.*.{n}\n" for n in names)
    if not path.exists() or path.read_text() != text:  # unchanged: no relink
        path.write_text(text)
    for ext in exts:
        if ext.name == "diktyo_hotpath__mypyc":
            # a new order relinks even when mypyc's C sources are unchanged (build_ext links
            # only when a source or a dependency is newer than the library)
            ext.depends = [*ext.depends, str(path)]
            ext.extra_compile_args = [*ext.extra_compile_args, IDLE_ORDER_FLAGS[0]]
            ext.extra_link_args = [
                *ext.extra_link_args,
                IDLE_ORDER_FLAGS[1],
                IDLE_ORDER_FLAGS[2] + str(path),
            ]


def unorder_idle_code(exts: list[Extension]) -> bool:
    """Drops ``order_idle_code``'s flags; whether there were any."""
    found = False
    for ext in exts:
        for attr in ("extra_compile_args", "extra_link_args"):
            kept = [a for a in getattr(ext, attr) if not a.startswith(IDLE_ORDER_FLAGS)]
            found = found or len(kept) != len(getattr(ext, attr))
            setattr(ext, attr, kept)
    return found


class BuildHotPath(build_ext):
    """build_ext that compiles HOT_PATH with mypyc, or records why it installs pure Python."""

    reason: str | None = None
    nghttp2_ext: Extension | None = None

    def finalize_options(self) -> None:
        # mypyc's extensions replace the placeholder before setuptools prepares them
        self.reason = self.plan()
        super().finalize_options()

    def run(self) -> None:
        for where in {str(ROOT / "src"), self.build_lib}:
            remove_strays(where)
        nghttp2 = "not built"
        if self.reason is None:
            try:
                try:
                    super().run()
                except Exception as exc:  # gold or its flags refused: link as before
                    if not unorder_idle_code(self.extensions):
                        raise
                    say(f"linking with the idle-code ordering failed ({exc}); linking without")
                    self.rerun()
                if self.nghttp2_ext is not None:
                    nghttp2 = "compiled"
            except Exception as exc:  # compiler or linker failure: install pure, say why
                if self.nghttp2_ext is not None and self.nghttp2_ext in self.extensions:
                    nghttp2 = f"the C build failed ({type(exc).__name__}: {exc})"
                    say(f"HTTP/2 C extension: {nghttp2}; the codec runs cffi's ABI mode")
                    self.extensions.remove(self.nghttp2_ext)
                    try:
                        self.rerun()
                    except Exception as exc2:
                        self.reason = f"the C build failed ({type(exc2).__name__}: {exc2})"
                        self.extensions = []
                else:
                    self.reason = f"the C build failed ({type(exc).__name__}: {exc})"
                    self.extensions = []
        out_dir = self.package_dir()
        info: dict[str, object] = {"compiled": self.reason is None, "nghttp2": nghttp2}
        if self.reason is None:
            import mypy.version

            info["compiler"] = f"mypyc {mypy.version.__version__}"
            info["modules"] = {
                m: BUILD["file_record"](BUILD["source_path"](m, str(ROOT / "src" / "diktyo")))
                for m in HOT_PATH
            }
            say(f"compiled {len(HOT_PATH)} hot-path modules with {info['compiler']}")
        else:
            # no compiled module of an earlier build may stay behind (build/lib, or src/ in place)
            for where in {os.path.dirname(out_dir), self.build_lib}:
                remove_compiled(where)
            info["reason"] = f"pure-Python install: {self.reason}"
            say(
                f"NOT compiling the hot path: {self.reason}. diktyo is installed as pure Python "
                "(works, slower per request). To compile it install a C compiler and Python's "
                "headers (Debian: apt-get install gcc libc6-dev python3.11-dev) and reinstall."
            )
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, BUILD["BUILD_INFO"]), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.write("\n")

    def rerun(self) -> None:
        """Builds the extensions again after a failure. Not ``super().run()``: that makes a new
        compiler from ``self.compiler``, which its first call replaced by the compiler object."""
        if isinstance(self.compiler, str) or self.compiler is None:
            super().run()
        else:
            self.build_extensions()

    def package_dir(self) -> str:
        if self.inplace or getattr(self, "editable_mode", False):
            return str(ROOT / "src" / "diktyo")
        return os.path.join(self.build_lib, "diktyo")

    def plan(self) -> str | None:
        """Sets the extensions to build; returns why none can be, or None."""
        self.distribution.ext_modules = []
        if os.environ.get("DIKTYO_PURE", "") not in ("", "0"):
            return "DIKTYO_PURE=1 was set while installing"
        reason = why_no_compiler()
        if reason is not None:
            return reason
        try:
            from mypyc.build import mypycify
        except ImportError as exc:
            return f"mypyc is not importable ({exc})"
        paths = [str(Path("src", *m.split(".")).with_suffix(".py")) for m in HOT_PATH]
        old = os.environ.get("MYPYPATH")
        os.environ["MYPYPATH"] = "src"
        try:
            exts = mypycify(MYPY_FLAGS + paths, opt_level="3", group_name="diktyo_hotpath")
        except SystemExit as exc:  # mypyc found a type error: reported above by mypy
            return f"mypyc could not compile the hot path (mypy exit {exc.code}; see above)"
        finally:
            if old is None:
                os.environ.pop("MYPYPATH", None)
            else:
                os.environ["MYPYPATH"] = old
        order_idle_code(exts)
        self.nghttp2_ext = None
        try:
            self.nghttp2_ext = NGHTTP2["ffibuilder"]().distutils_extension(
                tmpdir=str(ROOT / "build" / "cffi")
            )
            exts = [*exts, self.nghttp2_ext]
        except Exception as exc:  # noqa: BLE001 - cffi missing...: the codec runs ABI mode
            say(f"HTTP/2 C extension not built ({type(exc).__name__}: {exc}); cffi ABI mode runs")
        self.distribution.ext_modules = exts
        return None

    def get_outputs(self) -> list[str]:
        outs = [o for o in super().get_outputs() if PLACEHOLDER.rpartition(".")[2] not in o]
        return [*outs, os.path.join(self.package_dir(), BUILD["BUILD_INFO"])]


setup(
    ext_modules=[Extension(PLACEHOLDER, sources=[])],
    cmdclass={"build_ext": BuildHotPath},
)

"""Which build of the sidecar's hot path runs: compiled (mypyc) or pure Python.

``pip install`` compiles the modules in ``HOT_PATH`` with mypyc (``setup.py``) when a C compiler
and Python's headers are there; the ``.py`` sources stay beside the compiled ``.so`` files and
are what runs when:

- ``DIKTYO_PURE=1`` is set (an import hook loads the ``.py`` of every ``HOT_PATH`` module), or
- the build is stale: a ``.py`` no longer matches the source hash recorded when its ``.so`` was
  built (an edit in an editable install). Running the old compiled code would silently ignore
  the edit, so the pure sources run instead and a warning on stderr says how to rebuild
  (``make build`` or ``pip install -e .``).

mypyc compiles the modules as one group whose code calls each other directly, so the choice is
made for the whole group, never per module. ``status()`` says which build runs and why
(``diktyo --version``, the sidecar's ready line, the benchmarks). Only the standard library
is used here: this runs on every ``import diktyo``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# the modules setup.py compiles (one mypyc group); each must stay mypy --strict clean.
# Not here: proxy/http/phases.py (an IntEnum, a RuntimeError).
HOT_PATH: tuple[str, ...] = (
    "diktyo.proxy.codec.events",
    "diktyo.proxy.codec.http1",
    "diktyo.proxy.codec.http2_fields",  # HTTP/2 header lists and blocks (h2lean, stop 20)
    "diktyo.proxy.codec.http2_nghttp2",  # the libnghttp2 codec's Python side (h2fast, stop 19)
    "diktyo.proxy.http.connection_manager",
    "diktyo.proxy.http.context",
    "diktyo.proxy.http.h2_connection",  # HTTP/2 downstream (h2fast, stop 19)
    "diktyo.proxy.http.policies",
    "diktyo.proxy.http.upstream_request",
    "diktyo.proxy.network.h2pool",  # HTTP/2 upstream pool (h2fast, stop 19)
    "diktyo.proxy.network.pool",
    "diktyo.proxy.network.upstream",
    "diktyo.proxy.network.tlsrecord",  # the mTLS record layer (tls4, stop 21)
    "diktyo.proxy.filters.telemetry",
    "diktyo.proxy.router.matcher",
    "diktyo.proxy.router.retry",  # the retry budget's counters, per request (lean)
    "diktyo.proxy.upstream.circuit_breaker",  # workers share counts through a delegate (lean)
    "diktyo.proxy.upstream.cluster",
    "diktyo.proxy.upstream.host",
    "diktyo.proxy.upstream.lb",
    "diktyo.proxy.stats",
    "diktyo.telemetry.istio_metrics",
    "diktyo.telemetry.stats",
)
BUILD_INFO = "_build_info.json"  # written by setup.py next to this file
PURE_ENV = "DIKTYO_PURE"
REBUILD_HINT = "rebuild with `make build` (or `pip install -e .`), or set DIKTYO_PURE=1"

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_status: dict[str, object] = {"compiled": False, "reason": "not checked yet"}


def source_path(module: str, pkg_dir: str = _PKG_DIR) -> str:
    """The ``.py`` of a ``diktyo.*`` module under the package directory ``pkg_dir``."""
    return os.path.join(pkg_dir, *module.split(".")[1:]) + ".py"


def compiled_path(module: str, pkg_dir: str = _PKG_DIR) -> str | None:
    """The extension module file beside the ``.py`` of ``module``, if one was built."""
    base = source_path(module, pkg_dir)[: -len(".py")]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(base + suffix):
            return base + suffix
    return None


def file_record(path: str) -> dict[str, object]:
    """What the build records of a source: size, mtime and sha256 (setup.py calls this)."""
    # CPython's own SHA-256 (same digest): hashlib would load OpenSSL's _hashlib into every
    # sidecar whose sources' mtimes differ from the build's, e.g. an installed wheel: +0.55 MiB
    # of idle RSS (issue 11, rss)
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # CPython module without stubs
    except ImportError:
        from hashlib import sha256

    with open(path, "rb") as f:
        data = f.read()
    st = os.stat(path)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256(data).hexdigest(),
    }


def _matches(path: str, rec: dict[str, object]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return True  # no source shipped: the compiled module is all there is
    if st.st_size != rec.get("size"):
        return False
    if st.st_mtime_ns == rec.get("mtime_ns"):
        return True  # untouched since the build (the common case: no hashing)
    return file_record(path)["sha256"] == rec.get("sha256")  # touched, maybe same content


def check(pkg_dir: str = _PKG_DIR, modules: Sequence[str] = HOT_PATH) -> tuple[bool, str, bool]:
    """(compiled build usable, why, whether the developer must be warned) for ``pkg_dir``."""
    built = [m for m in modules if compiled_path(m, pkg_dir) is not None]
    info: dict[str, object] = {}
    try:
        with open(os.path.join(pkg_dir, BUILD_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        pass
    if not built:
        why = str(info.get("reason") or "the hot path was not compiled (pure-Python install)")
        return False, why, False
    if len(built) != len(modules):
        missing = sorted(set(modules) - set(built))
        return False, f"compiled build is incomplete (no .so for {', '.join(missing)})", True
    recs = info.get("modules")
    if not isinstance(recs, dict):
        return False, f"compiled modules have no build record ({BUILD_INFO})", True
    stale = [m for m in modules if not _matches(source_path(m, pkg_dir), recs.get(m) or {})]
    if stale:
        files = ", ".join(
            os.path.relpath(source_path(m, pkg_dir), os.path.dirname(pkg_dir)) for m in stale
        )
        return False, f"compiled build is stale: {files} changed since it was built", True
    return True, f"compiled with {info.get('compiler', 'mypyc')}", False


class PureFinder:
    """Loads the ``.py`` of the hot-path modules even where a compiled ``.so`` sits beside it
    (a meta path finder; not an ``importlib.abc`` subclass, which would import pathlib and
    shutil into every sidecar)."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or spec.origin.endswith(".py"):
            return spec
        py = os.path.join(os.path.dirname(spec.origin), fullname.rpartition(".")[2] + ".py")
        if not os.path.exists(py):
            return spec
        return importlib.util.spec_from_file_location(fullname, py)


def activate() -> None:
    """Decide the build once, at ``import diktyo``; installs the pure import hook if needed."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        ok, why, warn = False, f"{PURE_ENV}=1 (pure Python asked for)", False
    else:
        ok, why, warn = check()
    _status.update(compiled=ok, reason=why)
    if warn:
        print(f"diktyo: {why}: running pure Python; {REBUILD_HINT}", file=sys.stderr)
    if not ok and not any(isinstance(f, PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PureFinder(HOT_PATH))


def status() -> dict[str, object]:
    """``{"compiled": bool, "reason": str, "loaded": {module: file}}`` of this process."""
    loaded = {m: str(getattr(sys.modules[m], "__file__", "")) for m in HOT_PATH if m in sys.modules}
    return {**_status, "loaded": loaded}


def describe() -> str:
    """One line for ``diktyo --version`` and logs: ``compiled: yes (...)`` / ``compiled: no (...)``."""
    return f"compiled: {'yes' if _status['compiled'] else 'no'} ({_status['reason']})"

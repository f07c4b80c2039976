"""What the sidecar process costs in memory: the admin ``/memory`` report (issue 11).

The sidecar keeps its idle memory down by importing optional libraries only when a feature in
use needs them: ``h2`` (and ``hpack``, ``hyperframe``) on the first HTTP/2 connection or
HTTP/2 cluster, RE2 for the first regex; never the control plane's YAML loader, pydantic,
ruamel or aiohttp (``--config DIR`` translates in a short-lived child process).
``report()`` says which of them are loaded, so a test (and an operator) can check.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# top-level packages loaded only when a feature in use needs them (or never, in a sidecar)
OPTIONAL_MODULES = (
    "h2", "hpack", "hyperframe",  # HTTP/2 on the h2 codec: first h2 connection or h2 cluster
    "cffi", "_cffi_backend",  # HTTP/2 on libnghttp2 (the default codec when it loads)
    "re2",  # the first regex in the config (or an admin /stats?filter=)
    "cryptography",  # mTLS: workload certificates from the CA
    "pydantic", "pydantic_core", "ruamel", "yaml", "aiohttp", "yarl", "jsonschema",  # never
    "typing_extensions",  # never: msgspec imports without it (import_msgspec_lean)
)  # fmt: skip
NEVER_IN_SIDECAR = ("diktyo.api", "diktyo.control", "diktyo.dashboard", "diktyo.cli.main")
# standard-library modules an idle sidecar does without, each loaded only by what needs it
# (issue 11, "Idle RSS, stop 19" in docs/performance.md): argparse when ``python -m
# diktyo.proxy`` parses flags itself (``diktyo sidecar`` hands them over parsed), ctypes in
# worker processes, hashlib (OpenSSL's digests) never, ipaddress with capture or authz
# config, the idna codec (with unicodedata) at the first name lookup
LAZY_STDLIB = ("argparse", "ctypes", "hashlib", "_hashlib", "ipaddress", "encodings.idna")


def import_msgspec_lean() -> None:
    """Import msgspec without typing_extensions, at the start of a sidecar process (``python
    -m diktyo.proxy``, and a worker's ``python -m diktyo.proxy.workers``), before anything
    else imports it. msgspec takes ``get_type_hints`` (and ``Required``/``NotRequired``) from
    typing_extensions when it is installed, as it is beside pydantic; Python 3.11's ``typing``
    has all that the snapshot model's annotations use, and an idle sidecar saves the 0.3 MiB
    typing_extensions holds (issue 11). A ``None`` entry in ``sys.modules`` makes msgspec's
    guarded import fail over to ``typing``; removed right after, so any later import of
    typing_extensions in this process works as usual. A no-op once either is imported."""
    if "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        return
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail, by design
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]


GC_ENV = "DIKTYO_GC_GEN0"  # gen-0 threshold after start-up (0: no automatic collection)
GC_GEN0 = 20000  # the default (CPython's own is 700)


def settle_gc() -> None:
    """After start-up (config applied, listeners open): collect once, move what survived to
    the permanent generation (``gc.freeze()``: config objects leave the collector's view), and
    collect the young generation every ``GC_GEN0`` container allocations instead of every 700.
    Per-request objects die by reference counting; the collector is there for the rare cycle.
    ``$DIKTYO_GC_GEN0`` overrides the threshold (measuring; 0 turns automatic collection off,
    which lets cycles pile up: not for production)."""
    import gc

    gc.collect()
    gc.freeze()
    raw = os.environ.get(GC_ENV, "")
    gen0 = int(raw) if raw.isdigit() else GC_GEN0
    if gen0 == 0:
        gc.disable()
    else:
        gc.set_threshold(gen0, 20, 20)


def _status_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the report then has modules only
    return out


def loaded_optional() -> list[str]:
    """The optional packages (``OPTIONAL_MODULES``, ``NEVER_IN_SIDECAR``) loaded in this process."""
    tops = {name.partition(".")[0] for name in sys.modules}
    found = [m for m in OPTIONAL_MODULES if m in tops]
    found += [m for m in NEVER_IN_SIDECAR if m in sys.modules]
    return found


def loaded_lazy_stdlib() -> list[str]:
    """The modules of ``LAZY_STDLIB`` loaded in this process."""
    return [m for m in LAZY_STDLIB if m in sys.modules]


def report() -> dict[str, Any]:
    """RSS (bytes, from /proc/self/status), peak RSS, its anonymous and file-backed parts, the
    number of Python modules loaded, which optional ones are among them and which of the
    standard library's that an idle sidecar does without."""
    st = _status_kib()
    return {
        "rss_bytes": st.get("VmRSS", 0) * 1024,
        "peak_rss_bytes": st.get("VmHWM", 0) * 1024,
        "anon_bytes": st.get("RssAnon", 0) * 1024,
        "file_bytes": st.get("RssFile", 0) * 1024,
        "python_modules": len(sys.modules),
        "optional_modules_loaded": loaded_optional(),
        "lazy_stdlib_loaded": loaded_lazy_stdlib(),
    }

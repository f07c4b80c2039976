"""What the sidecar process costs in memory: the admin ``/memory`` report (issue 11).

The sidecar keeps its idle memory down by importing optional libraries only when a feature in
use needs them: ``h2`` (and ``hpack``, ``hyperframe``) on the first HTTP/2 connection or
HTTP/2 cluster, RE2 for the first regex; never the control plane's YAML loader, pydantic,
ruamel or aiohttp (``--config DIR`` translates in a short-lived child process).
``report()`` says which of them are loaded, so a test (and an operator) can check.
"""

from __future__ import annotations

import sys
from typing import Any

# top-level packages loaded only when a feature in use needs them (or never, in a sidecar)
OPTIONAL_MODULES = (
    "h2", "hpack", "hyperframe",  # HTTP/2 on the h2 codec: first h2 connection or h2 cluster
    "cffi", "_cffi_backend",  # HTTP/2 on libnghttp2 (the default codec when it loads)
    "re2",  # the first regex in the config (or an admin /stats?filter=)
    "cryptography",  # mTLS: workload certificates from the CA
    "pydantic", "pydantic_core", "ruamel", "yaml", "aiohttp", "yarl", "jsonschema",  # never
)  # fmt: skip
NEVER_IN_SIDECAR = ("diktyo.api", "diktyo.control", "diktyo.dashboard", "diktyo.cli.main")


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


def report() -> dict[str, Any]:
    """RSS (bytes, from /proc/self/status), peak RSS, its anonymous and file-backed parts, the
    number of Python modules loaded and which optional ones are among them."""
    st = _status_kib()
    return {
        "rss_bytes": st.get("VmRSS", 0) * 1024,
        "peak_rss_bytes": st.get("VmHWM", 0) * 1024,
        "anon_bytes": st.get("RssAnon", 0) * 1024,
        "file_bytes": st.get("RssFile", 0) * 1024,
        "python_modules": len(sys.modules),
        "optional_modules_loaded": loaded_optional(),
    }

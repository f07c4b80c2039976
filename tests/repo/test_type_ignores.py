"""No new ``# type: ignore`` without a reason on the line (issue 13).

A suppression names its error code and says why after it::

    x = lib.thing()  # type: ignore[attr-defined]  # lib's stubs lack .thing (lib#123)

The ones that were there when the type checker came in are counted per file below; a file may
lose some, never gain. (mypy itself rejects a bare ``# type: ignore`` without a code, and an
unused one.)
"""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
IGNORE = re.compile(r"#\s*type:\s*ignore(?:\[[^\]]*\])?(?P<rest>.*)$")
REASON = re.compile(r"\s*#\s*\S")

# file -> how many reason-less suppressions it had when mypy came into `make lint`
BASELINE = {
    "diktyo/api/loader.py": 1,
    "diktyo/cli/analyze.py": 1,
    "diktyo/cli/apply.py": 1,
    "diktyo/cli/control_plane.py": 1,
    "diktyo/cli/dashboard.py": 1,
    "diktyo/cli/delete.py": 1,
    "diktyo/cli/demo.py": 2,
    "diktyo/cli/down.py": 1,
    "diktyo/cli/explain.py": 2,
    "diktyo/cli/install.py": 1,
    "diktyo/cli/kube_inject.py": 1,
    "diktyo/cli/prometheus_config.py": 1,
    "diktyo/cli/proxy_config.py": 1,
    "diktyo/cli/proxy_status.py": 1,
    "diktyo/cli/sidecar.py": 1,
    "diktyo/cli/stat.py": 1,
    "diktyo/cli/status.py": 1,
    "diktyo/cli/up.py": 1,
    "diktyo/control/ca/authority.py": 2,
    "diktyo/control/inject/crds.py": 1,
    "diktyo/control/inject/manifest.py": 1,
    "diktyo/control/server.py": 3,
    "diktyo/control/translate/clusters.py": 1,
    "diktyo/control/translate/listeners.py": 1,
    "diktyo/load/client.py": 1,
    "diktyo/platform/harness.py": 2,
    "diktyo/platform/mesh.py": 1,
    "diktyo/proxy/admin.py": 1,
    "diktyo/proxy/http/connection_manager.py": 3,
    "diktyo/proxy/main.py": 1,
    "diktyo/proxy/network/listener.py": 1,
    "diktyo/proxy/network/upstream.py": 1,
    "diktyo/proxy/sidecar.py": 1,
    "diktyo/proxy/tcp_proxy.py": 2,
    "diktyo/security/identity.py": 1,
    "diktyo/telemetry/store.py": 1,
    "diktyo/testing/fake_upstream.py": 1,
    "diktyo/testing/prometheus.py": 1,
}


def reasonless() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = IGNORE.search(line)
            if m and not REASON.match(m.group("rest")):
                found.setdefault(path.relative_to(SRC).as_posix(), []).append(n)
    return found


def test_no_new_type_ignore_without_a_reason() -> None:
    grown = {
        f"{name}:{lines}": f"{len(lines)} > {BASELINE.get(name, 0)}"
        for name, lines in reasonless().items()
        if len(lines) > BASELINE.get(name, 0)
    }
    assert not grown, (
        "`# type: ignore[code]` needs a reason after it on the same line "
        f"(`# type: ignore[code]  # why`): {grown}"
    )


def test_the_check_sees_a_reasonless_ignore() -> None:
    line = "x = f()  # type: ignore[attr-defined]"
    m = IGNORE.search(line)
    assert m is not None and not REASON.match(m.group("rest"))
    m = IGNORE.search(line + "  # f comes from a C extension without stubs")
    assert m is not None and REASON.match(m.group("rest"))

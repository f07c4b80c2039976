"""``diktyo proxy-config WORKLOAD telemetry`` and delegated routes in ``routes``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diktyo.api import load_paths
from diktyo.cli.proxy_config import _render
from diktyo.control.model import ProxyNode, PushContext, Registry
from diktyo.control.translate import translate
from diktyo.snapshot import to_builtins
from diktyo.snapshot.model import Node

TESTDATA = Path(__file__).resolve().parents[1] / "control" / "translate" / "testdata"


def translate_case(path: Path) -> dict[str, Any]:
    """The snapshot for productpage-v1 (namespace default) from one golden input's resources."""
    result = load_paths([path])
    push = PushContext(tuple(result.resources), Registry(), version="1")
    node = Node(id="pp", workload="productpage-v1", labels={"app": "productpage"})
    return to_builtins(translate(ProxyNode(node=node, outbound_port=15001), push))  # type: ignore[no-any-return]


def test_telemetry_section_shows_the_merged_policy() -> None:
    snap = translate_case(TESTDATA / "telemetry.in.yaml")
    text = _render(snap, "telemetry")
    client, server = (ln for ln in text.splitlines() if ln.startswith(("client", "server")))
    assert "on" in client.split() and "response.code >= 400" in client and "100%" in client
    assert server.split()[1] == "off"  # the workload Telemetry: inbound log off
    assert "metric override REQUEST_DURATION (CLIENT): disabled" in text
    assert "metric override REQUEST_COUNT (CLIENT_AND_SERVER): -request_protocol" in text
    assert text.endswith(
        "from Telemetry: istio-system/mesh-default, default/namespace, default/productpage"
    )


def test_without_telemetry_the_mesh_defaults_are_named() -> None:
    snap = translate_case(TESTDATA / "reviews-jason.in.yaml")
    assert _render(snap, "telemetry").startswith("no Telemetry applies: mesh defaults")


def test_routes_name_the_delegate() -> None:
    snap = translate_case(TESTDATA / "delegation.in.yaml")
    text = _render(snap, "routes")
    assert "reviews via team-a/reviews-api" in text

"""What translation tests share: the proxies they translate for, and Istio or Gateway API YAML
turned into a snapshot the sidecar would accept."""

from __future__ import annotations

from diktyo.api import load_text
from diktyo.control.model import ProxyNode, PushContext, Registry
from diktyo.control.translate import translate
from diktyo.snapshot.codec import validate
from diktyo.snapshot.model import Node, Snapshot

# the ingress gateway of Istio's samples (label istio: ingressgateway), serving port 80
INGRESS_GATEWAY = ProxyNode(
    node=Node(
        id="istio-ingressgateway.istio-system",
        workload="istio-ingressgateway",
        namespace="istio-system",
        labels={"istio": "ingressgateway"},
        mode="gateway",
    ),
    gateway_ports={80: 0},
)


def translate_yaml(
    text: str,
    proxy: ProxyNode,
    registry: Registry,
    file: str = "test.yaml",
    allow_warnings: bool = True,
) -> Snapshot:
    """The snapshot of ``proxy`` for the config in ``text``. Fails the test when the YAML has
    errors (or, with ``allow_warnings=False``, warnings) or when the snapshot would be refused
    by the sidecar's own check (``validate``), which is what it runs before it ACKs one."""
    result = load_text(text, file)
    assert result.ok, [str(e) for e in result.errors]
    if not allow_warnings:
        assert result.errors == [], [str(e) for e in result.errors]
    out = translate(proxy, PushContext(resources=tuple(result.resources), registry=registry))
    assert validate(out) == []
    return out

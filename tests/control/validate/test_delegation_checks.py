"""analyze(): delegation problems (delegate not exported, delegate routes outside the root match)."""

from __future__ import annotations

from diktyo.api import load_text
from diktyo.control.validate import analyze

ROOT = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: [shop.example.com]
  http:
  - match: [{uri: {prefix: /api}}]
    delegate: {name: api, namespace: team}
"""

LEAF = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: team}
spec:
EXPORT
  http:
  - match: [{uri: {prefix: /api/v1}}]
    route: [{destination: {host: shop.example.com}}]
  - match: [{uri: {prefix: /web}}]
    route: [{destination: {host: shop.example.com}}]
"""


def test_delegate_route_outside_root_match_is_reported_on_the_delegate() -> None:
    result = load_text(ROOT + LEAF.replace("EXPORT\n", ""), "in.yaml")
    assert result.ok, [str(e) for e in result.errors]
    (p,) = analyze(result.resources)
    assert p.severity == "warning"
    assert p.field == "spec.http[1].match"
    assert "never used from VirtualService default/root http[0]" in p.message
    assert p.line == 17  # the delegate's second rule's match


def test_delegate_not_exported_to_the_root_namespace() -> None:
    result = load_text(ROOT + LEAF.replace("EXPORT", '  exportTo: ["."]'), "in.yaml")
    assert result.ok, [str(e) for e in result.errors]
    (p,) = analyze(result.resources)
    assert "not exported to namespace default" in p.message
    assert p.field == "spec.http[0].delegate"


def test_delegate_with_hosts_is_no_delegate() -> None:
    leaf = LEAF.replace("EXPORT", "  hosts: [api.team.svc.cluster.local]")
    result = load_text(ROOT + leaf, "in.yaml")
    assert result.ok, [str(e) for e in result.errors]
    (p,) = analyze(result.resources)
    assert "has hosts, so it cannot be a delegate" in p.message
    assert p.field == "spec.http[0].delegate"

"""Conformance: documents Istio's validation rejects are rejected.

Each case breaks one validation rule that Istio's CRDs declare (``x-kubernetes-validations``
CEL rules, read from ``../shared/istio/customresourcedefinitions.gen.yaml``, so the rule is
checked to exist there) and must give a loader error; the same document without the breaking
part must load cleanly (so the error comes from that rule and nothing else).
"""

from __future__ import annotations

from typing import Any

import pytest

from diktyo.api import load_text


@pytest.fixture(scope="module")
def crd_rules(istio_crd_docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """kind -> the messages of its CEL validation rules (``istio_crd_docs``: the CRD file
    parsed once per session, tests/conftest.py)."""
    out: dict[str, set[str]] = {}

    def walk(node: Any, kind: str) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations") or []:
                out.setdefault(kind, set()).add(rule.get("message", ""))
            for v in node.values():
                walk(v, kind)
        elif isinstance(node, list):
            for v in node:
                walk(v, kind)

    for doc in istio_crd_docs:
        if doc.get("kind") == "CustomResourceDefinition":
            walk(doc["spec"]["versions"], doc["spec"]["names"]["kind"])
    return out


NET = "networking.istio.io/v1"
SEC = "security.istio.io/v1"

# (kind, apiVersion, valid spec, broken spec, CRD rule message)
CASES = [
    (
        "ServiceEntry",
        NET,
        "hosts: [a.example.com]\nresolution: STATIC\nendpoints: [{address: 10.0.0.1}]",
        "hosts: [a.example.com]\nresolution: NONE\nendpoints: [{address: 10.0.0.1}]",
        "NONE mode cannot set endpoints",
    ),
    (
        "ServiceEntry",
        NET,
        "hosts: [a.example.com]\nworkloadSelector: {labels: {app: a}}",
        (
            "hosts: [a.example.com]\nworkloadSelector: {labels: {app: a}}\n"
            "endpoints: [{address: 10.0.0.1}]"
        ),
        "only one of WorkloadSelector or Endpoints can be set",
    ),
    (
        "ServiceEntry",
        NET,
        "hosts: [a.example.com]\nresolution: DNS_ROUND_ROBIN\nendpoints: [{address: a.example.com}]",
        (
            "hosts: [a.example.com]\nresolution: DNS_ROUND_ROBIN\n"
            "endpoints: [{address: a.example.com}, {address: b.example.com}]"
        ),
        "DNS_ROUND_ROBIN mode cannot have multiple endpoints",
    ),
    (
        "ServiceEntry",
        NET,
        "hosts: [a.example.com]\nports: [{number: 80, name: http}]",
        "hosts: [a.example.com]\nports: [{number: 80, name: http}, {number: 80, name: http2}]",
        "port number cannot be duplicated",
    ),
    (
        "ServiceEntry",
        NET,
        "hosts: [a.example.com]",
        "hosts: ['*']",
        "hostname cannot be wildcard",
    ),
    (
        "ServiceEntry",
        NET,
        (
            "hosts: [a.example.com]\naddresses: [10.0.0.0/24]\nresolution: STATIC\n"
            "endpoints: [{address: 10.0.0.1}]"
        ),
        "hosts: [a.example.com]\naddresses: [10.0.0.0/24]\nresolution: DNS",
        "CIDR addresses are allowed only for NONE/STATIC resolution types",
    ),
    (
        "ServiceEntry",
        NET,
        (
            "hosts: [a.example.com]\nresolution: STATIC\n"
            "endpoints: [{address: 10.0.0.1, ports: {http: 8080}}]"
        ),
        (
            "hosts: [a.example.com]\nresolution: STATIC\n"
            "endpoints: [{address: 10.0.0.1, ports: {http: 0}}]"
        ),
        "port must be between 1-65535",
    ),
    (
        "DestinationRule",
        NET,
        "host: a\nworkloadSelector: {matchLabels: {app: a}}",
        "host: a\nworkloadSelector: {matchLabels: {app: '*'}}",
        "wildcard not allowed in label value match",
    ),
    (
        "DestinationRule",
        NET,
        "host: a\ntrafficPolicy: {connectionPool: {http: {http2KeepAlive: {interval: 1s}}}}",
        "host: a\ntrafficPolicy: {connectionPool: {http: {http2KeepAlive: {interval: 0s}}}}",
        "must be a valid duration greater than 1ms",
    ),
    (
        "VirtualService",
        NET,
        "hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]\n  corsPolicy: {maxAge: 24h}",
        "hosts: [a]\nhttp:\n- route: [{destination: {host: a}}]\n  corsPolicy: {maxAge: 0s}",
        "must be a valid duration greater than 1ms",
    ),
    (
        "Gateway",
        NET,
        (
            "servers:\n- port: {number: 443, name: https, protocol: HTTPS}\n  hosts: ['*']\n"
            "  tls: {mode: SIMPLE, credentialName: a}"
        ),
        (
            "servers:\n- port: {number: 443, name: https, protocol: HTTPS}\n  hosts: ['*']\n"
            "  tls: {mode: SIMPLE, credentialName: a, credentialNames: [b]}"
        ),
        "only one of credentialName or credentialNames can be set",
    ),
    (
        "Sidecar",
        NET,
        "workloadSelector: {labels: {app: a}}",
        "workloadSelector: {labels: {app: 'a*'}}",
        "wildcard is not supported in selector",
    ),
    (
        "AuthorizationPolicy",
        SEC,
        "selector: {matchLabels: {app: a}}",
        (
            "selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Gateway, group: "
            "gateway.networking.k8s.io, name: g}]"
        ),
        "only one of targetRefs or selector can be set",
    ),
    (
        "AuthorizationPolicy",
        SEC,
        "rules:\n- from:\n  - source: {principals: [a]}",
        "rules:\n- from:\n  - source: {principals: [a], serviceAccounts: [ns/sa]}",
        "Cannot set serviceAccounts with namespaces or principals",
    ),
    (
        "AuthorizationPolicy",
        SEC,
        "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g}",
        "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g, namespace: o}",
        "cross namespace referencing is not currently supported",
    ),
    (
        "PeerAuthentication",
        SEC,
        "selector: {matchLabels: {app: a}}\nportLevelMtls: {'8080': {mode: DISABLE}}",
        "portLevelMtls: {'8080': {mode: DISABLE}}",
        "portLevelMtls requires selector",
    ),
    (
        "PeerAuthentication",
        SEC,
        "selector: {matchLabels: {app: a}}\nportLevelMtls: {'8080': {mode: DISABLE}}",
        "selector: {matchLabels: {app: a}}\nportLevelMtls: {'70000': {mode: DISABLE}}",
        "port must be between 1-65535",
    ),
    (
        "PeerAuthentication",
        SEC,
        "selector: {matchLabels: {app: a}}",
        "selector: {matchLabels: {'': a}}",
        "key must not be empty",
    ),
    (
        "RequestAuthentication",
        SEC,
        "jwtRules: [{issuer: a, jwksUri: 'https://a/jwks'}]",
        "jwtRules: [{issuer: a, jwksUri: 'https://a/jwks', jwks: '{}'}]",
        "only one of jwks or jwksUri can be set",
    ),
    (
        "RequestAuthentication",
        SEC,
        "jwtRules: [{issuer: a, jwksUri: 'https://a/jwks'}]",
        "jwtRules: [{issuer: a, jwksUri: 'ftp://a/jwks'}]",
        "url must have scheme http:// or https://",
    ),
    (
        "RequestAuthentication",
        SEC,
        "jwtRules: [{issuer: a, jwksUri: 'https://a/jwks', timeout: 5s}]",
        "jwtRules: [{issuer: a, jwksUri: 'https://a/jwks', timeout: 0s}]",
        "must be a valid duration greater than 1ms",
    ),
]


def _doc(kind: str, api_version: str, spec: str) -> str:
    body = "".join(f"  {line}\n" for line in spec.splitlines())
    return f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x}}\nspec:\n{body}"


@pytest.mark.parametrize(
    ("kind", "api_version", "good", "bad", "rule"),
    CASES,
    ids=[f"{c[0]}:{c[4]}" for c in CASES],
)
def test_istio_validation_rule_is_enforced(
    kind: str, api_version: str, good: str, bad: str, rule: str, crd_rules: dict[str, set[str]]
) -> None:
    assert rule in crd_rules.get(kind, set()), f"{kind}: no CRD rule {rule!r}"
    ok = load_text(_doc(kind, api_version, good), "good.yaml")
    assert [str(e) for e in ok.errors] == [] and len(ok.resources) == 1
    rejected = load_text(_doc(kind, api_version, bad), "bad.yaml")
    assert rejected.resources == []
    assert [e.severity for e in rejected.errors] == ["error"], [str(e) for e in rejected.errors]

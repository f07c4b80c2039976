"""Gateway API kinds load with Gateway API's field names; bad fields name file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from diktyo.api import load_paths, load_text
from diktyo.api.gateway_api import parse_gateway_duration

SAMPLES = Path(__file__).resolve().parents[2] / ".." / "shared" / "istio" / "samples"

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - path:
        type: {ptype}
        value: {pvalue}
    backendRefs:
    - name: reviews
      port: 9080
"""


def errors(text: str) -> list[str]:
    return [str(e) for e in load_text(text, "r.yaml").errors]


def test_every_gateway_api_sample_of_istio_loads() -> None:
    files = sorted(SAMPLES.glob("*/gateway-api/*.yaml"))
    assert len(files) >= 9
    result = load_paths(files)
    bad = [str(e) for e in result.errors if e.severity == "error"]
    assert not bad, bad
    kinds = {(r.kind, r.api_version) for r in result.resources}
    assert ("HTTPRoute", "gateway.networking.k8s.io/v1") in kinds
    assert ("Gateway", "gateway.networking.k8s.io/v1") in kinds


def test_gateway_api_gateway_is_not_istio_gateway() -> None:
    text = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""
    result = load_text(text, "gw.yaml")
    assert result.ok and not result.errors
    api, istio = result.resources
    assert api.key == "Gateway.gateway.networking.k8s.io/default/gw"
    assert istio.key == "Gateway/default/gw"  # same kind and name, two objects
    assert type(api.spec).__name__ == "GatewaySpec" and type(istio.spec).__name__ == "Gateway"


def test_unknown_field_names_position_and_suggestion() -> None:
    text = ROUTE.format(ptype="Exact", pvalue="/x").replace("backendRefs:", "backendRef:")
    (err,) = errors(text)
    assert err.startswith("r.yaml:13:5: error: spec.rules[0].backendRef: unknown field")
    assert "did you mean 'backendRefs'" in err


@pytest.mark.parametrize(
    ("ptype", "pvalue", "message"),
    [
        ("Prefix", "/x", "invalid value 'Prefix'"),
        ("Exact", "x", "must be an absolute path"),
        ("RegularExpression", "'(?=x)'", "RE2 cannot compile"),
        ("PathPrefix", "/a//b", "must not contain"),
    ],
)
def test_bad_path_matches(ptype: str, pvalue: str, message: str) -> None:
    (err,) = errors(ROUTE.format(ptype=ptype, pvalue=pvalue))
    assert err.startswith("r.yaml:1"), err
    assert "spec.rules[0].matches[0].path" in err and message in err, err


def test_backend_ref_to_a_service_needs_a_port() -> None:
    text = ROUTE.format(ptype="Exact", pvalue="/x").replace("      port: 9080\n", "")
    (err,) = errors(text)
    assert "r.yaml:14:" in err and "must have port for Service reference" in err, err


def test_filter_type_and_field_must_agree() -> None:
    text = ROUTE.format(ptype="Exact", pvalue="/x") + (
        "    filters:\n"
        "    - type: RequestHeaderModifier\n"
        "      responseHeaderModifier: {set: [{name: a, value: b}]}\n"
    )
    (err,) = errors(text)
    assert "spec.rules[0].filters[0]" in err
    assert "filter.requestHeaderModifier must be specified" in err, err


def test_redirect_with_backend_refs_and_prefix_rewrite_on_exact_are_refused() -> None:
    text = ROUTE.format(ptype="Exact", pvalue="/x") + (
        "    filters:\n"
        "    - type: URLRewrite\n"
        "      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}\n"
    )
    assert "ReplacePrefixMatch can only be used with a PathPrefix" in errors(text)[0]
    text = ROUTE.format(ptype="Exact", pvalue="/x") + (
        "    filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 307}\n"
    )
    assert "spec.rules[0].filters[0].requestRedirect.statusCode" in errors(text)[0]


def test_listener_rules() -> None:
    text = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "Bad_Host"}
  - {name: https, port: 443, protocol: HTTPS}
  - {name: http, port: 0, protocol: HTTP}
"""
    errs = errors(text)
    assert any("spec.listeners[0].hostname" in e and "invalid hostname" in e for e in errs), errs
    assert any("r.yaml:8:" in e and "tls must be specified" in e for e in errs), errs
    assert any("spec.listeners[2].port" in e and ">= 1" in e for e in errs), errs


def test_reference_grant_and_grpcroute_load() -> None:
    text = """\
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: g, namespace: prod}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: echo, port: 9000}]
"""
    result = load_text(text, "g.yaml")
    assert result.ok and result.errors == []  # used, no longer "ignored until HTTP/2"
    assert [r.kind for r in result.resources] == ["ReferenceGrant", "GRPCRoute"]
    m = result.resources[1].spec.rules[0].matches[0].method  # type: ignore[attr-defined]
    assert (m.type, m.service, m.method) == ("Exact", "helloworld.Greeter", "SayHello")


GRPC = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: grpc}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{match}]
    filters: [{filters}]
    backendRefs: [{{name: echo, port: 9000}}]
"""


@pytest.mark.parametrize(
    ("match", "filters", "expect"),
    [
        ("{method: {type: Exact}}", "", "one or both of 'service' or 'method' must be specified"),
        ("{method: {service: 'hello world'}}", "", "must be a gRPC service name"),
        ("{method: {method: 'Say.Hello'}}", "", "must be a gRPC method name"),
        ("{method: {type: RegularExpression, method: '('}}", "", "regular expression"),
        ("{method: {type: Prefix, service: a.B}}", "", "'Exact' or 'RegularExpression'"),
        (
            "{headers: [{name: a, value: x}, {name: a, value: y}]}",
            "",
            "header names must be unique",
        ),
        (
            "{}",
            "{type: URLRewrite, urlRewrite: {hostname: x}}",
            "'RequestHeaderModifier', 'ResponseHeaderModifier', 'RequestMirror' or 'ExtensionRef'",
        ),
        (
            "{}",
            "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}, "
            "{type: RequestHeaderModifier, requestHeaderModifier: {remove: [c]}}",
            "RequestHeaderModifier filter cannot be repeated",
        ),
    ],
)
def test_grpcroute_validation(match: str, filters: str, expect: str) -> None:
    errs = errors(GRPC.format(match=match, filters=filters))
    assert any(expect in e and "r.yaml:" in e for e in errs), errs


def test_unsupported_version() -> None:
    text = ROUTE.format(ptype="Exact", pvalue="/x").replace("/v1\n", "/v1alpha1\n", 1)
    (err,) = errors(text)
    assert "unsupported apiVersion 'gateway.networking.k8s.io/v1alpha1' for kind HTTPRoute" in err


def test_durations() -> None:
    assert parse_gateway_duration("1h30m") == 5400.0
    assert parse_gateway_duration("500ms") == 0.5
    for bad in ("1.5s", "1d", "", "123456s"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_gateway_duration(bad)

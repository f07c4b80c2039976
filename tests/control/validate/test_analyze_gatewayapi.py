"""analyze(): Gateway API status conditions (Accepted, ResolvedRefs) as findings at file:line:col."""

from __future__ import annotations

from pathlib import Path

from diktyo.api import ConfigError, load_paths, load_text
from diktyo.control.validate import analyze, registry_for_hosts

SAMPLES = Path(__file__).resolve().parents[3] / ".." / "shared" / "istio" / "samples"
BOOKINFO = ["productpage", "reviews", "ratings", "details"]
VERSIONS = ["productpage-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "details-v1"]

GW = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: infra}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    hostname: "*.example.com"
  - name: https
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: cert}]}
---
"""


def _msg(p: ConfigError) -> str:
    """A finding's message with its resource in front (``Kind name: message``)."""
    kind = getattr(p, "kind", "")
    return f"{kind} {getattr(p, 'resource', '')}: {p.message}" if kind else p.message


def run(text: str, hosts: list[str] | None = None) -> list[ConfigError]:
    result = load_text(text, "in.yaml")
    assert [str(e) for e in result.errors] == []
    return analyze(result.resources, registry_for_hosts(hosts) if hosts else None)


def route(parent: str, backend: str = "{name: reviews, port: 9080}", extra: str = "") -> str:
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r}}
spec:
  parentRefs: [{parent}]
{extra}  rules:
  - backendRefs: [{backend}]
"""


def test_bookinfo_samples_are_clean() -> None:
    d = SAMPLES / "bookinfo" / "gateway-api"
    for name in ("bookinfo-gateway.yaml", "route-reviews-90-10.yaml", "route-all-v1.yaml"):
        result = load_paths([d / name])
        problems = analyze(result.resources, registry_for_hosts(BOOKINFO + VERSIONS))
        assert problems == [], (name, [str(p) for p in problems])


def test_missing_gateway_is_no_matching_parent() -> None:
    (p,) = run(route("{name: nosuch}"), ["reviews"])
    assert (p.severity, p.line, p.col, p.field) == ("error", 5, 16, "spec.parentRefs[0]")
    assert "Accepted=False (NoMatchingParent)" in _msg(p) and "Gateway not found" in _msg(p)
    assert _msg(p).startswith("HTTPRoute r: parentRef Gateway default/nosuch")


def test_listener_namespace_policy_and_hostname() -> None:
    # Same (default) namespace policy: a route in another namespace is refused
    (p,) = [x for x in run(GW + route("{name: gw, namespace: infra}")) if "r:" in _msg(x)]
    assert "Accepted=False (NotAllowedByListeners)" in _msg(p)
    # in the Gateway's namespace but without a matching hostname
    text = GW + route(
        "{name: gw, namespace: infra, sectionName: http}", extra="  hostnames: [shop.other.org]\n"
    ).replace("name: r}", "name: r, namespace: infra}")
    (p,) = [x for x in run(text) if "HTTPRoute" in _msg(x)]
    assert "Accepted=False (NoMatchingListenerHostname)" in _msg(p)
    # a listener name that does not exist
    text = GW + route("{name: gw, namespace: infra, sectionName: web}").replace(
        "name: r}", "name: r, namespace: infra}"
    )
    (p,) = [x for x in run(text) if "HTTPRoute" in _msg(x)]
    assert "NoMatchingParent" in _msg(p) and "no listener named 'web'" in _msg(p)


def test_https_listener_is_reported_unsupported() -> None:
    (p,) = run(GW)
    assert p.severity == "warning" and p.field == "spec.listeners[1].protocol"
    assert "UnsupportedProtocol" in _msg(p) and "TLS termination" in _msg(p)
    assert p.line == 13


def test_backend_not_found_only_with_a_registry() -> None:
    text = route('{group: "", kind: Service, name: reviews}', "{name: reviewz, port: 9080}")
    assert run(text) == []  # no registry: existence unknown
    (p,) = run(text, ["reviews"])
    assert p.field == "spec.rules[0].backendRefs[0]" and p.line == 7
    assert "ResolvedRefs=False (BackendNotFound)" in _msg(p)
    assert "reviewz.default.svc.cluster.local not found" in _msg(p)
    (p,) = run(route('{group: "", kind: Service, name: reviews, port: 9090}'), ["reviews"])
    assert "NoMatchingParent" in _msg(p) and "has no port 9090" in _msg(p)


def test_cross_namespace_backend_needs_a_reference_grant() -> None:
    text = route(
        '{kind: Service, group: "", name: reviews}', "{name: ratings, namespace: prod, port: 9080}"
    )
    (p,) = run(text)
    assert "ResolvedRefs=False (RefNotPermitted)" in _msg(p)
    assert "add a ReferenceGrant in 'prod'" in p.hint
    grant = """---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: g, namespace: prod}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service, name: ratings}]
"""
    assert run(text + grant) == []


def test_invalid_kinds() -> None:
    text = route(
        "{group: networking.istio.io, kind: Gateway, name: gw}",
        "{group: example.com, kind: Bucket, name: b}",
    )
    msgs = [_msg(p) for p in run(text)]
    assert any("Accepted=False (UnsupportedValue)" in m for m in msgs), msgs
    assert any("ResolvedRefs=False (InvalidKind)" in m for m in msgs), msgs


def test_gamma_route_beside_a_virtual_service_is_a_warning() -> None:
    text = (
        route('{group: "", kind: Service, name: reviews}')
        + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}]}]
"""
    )
    (p,) = run(text, ["reviews"])
    assert p.severity == "warning" and _msg(p).startswith("VirtualService reviews: host ")
    assert "HTTPRoute default/r" in _msg(p)


def test_other_gateway_classes_and_grpcroute() -> None:
    text = GW.replace("gatewayClassName: istio", "gatewayClassName: istio-waypoint")
    (p,) = run(text)
    assert p.field == "spec.gatewayClassName" and "waypoints" in _msg(p)
    grpc = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec: {parentRefs: [{name: gw}]}
"""
    result = load_text(grpc, "g.yaml")
    problems = analyze(result.resources, None)
    # a GRPCRoute is bound like an HTTPRoute: its parent Gateway is missing
    assert [p.severity for p in problems] == ["error"], [_msg(p) for p in problems]
    assert "Accepted=False (NoMatchingParent)" in _msg(problems[0]), _msg(problems[0])
    assert _msg(problems[0]).startswith("GRPCRoute g:"), _msg(problems[0])


GRPC_SAMPLE = Path(__file__).resolve().parents[3] / "samples" / "grpc" / "grpcroute.yaml"


def _kube_services(*names: str, port: int = 7070) -> str:
    return "".join(
        f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\n"
        f"spec: {{selector: {{app: ratings}}, ports: [{{name: grpc, port: {port}}}]}}\n"
        for n in names
    )


def test_grpcroute_sample_with_its_services_is_clean_and_a_missing_backend_is_named() -> None:
    text = GRPC_SAMPLE.read_text()
    ok = load_text(text + _kube_services("ratings", "ratings-v1", "ratings-v2"), "g.yaml")
    assert [str(e) for e in ok.errors] == []
    assert [_msg(p) for p in analyze(ok.resources)] == []
    missing = load_text(text + _kube_services("ratings", "ratings-v1"), "g.yaml")
    problems = analyze(missing.resources)
    # each of the three backendRefs to ratings-v2, on its own line, as ResolvedRefs=False
    assert len(problems) == 3 and all(p.severity == "error" for p in problems), problems
    assert all(
        "GRPCRoute ratings:" in _msg(p)
        and "ResolvedRefs=False (BackendNotFound)" in _msg(p)
        and "ratings-v2.default.svc.cluster.local not found" in _msg(p)
        for p in problems
    ), [_msg(p) for p in problems]
    assert len({p.line for p in problems}) == 3


def test_grpcroute_extension_ref_filter_is_reported() -> None:
    text = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Auth, name: a}}]
    backendRefs: [{name: reviews, port: 9080}]
"""
    (p,) = run(text, ["reviews"])
    assert p.field == "spec.rules[0].filters[0]" and "ExtensionRef filters are not supported" in _msg(p)
    assert _msg(p).startswith("GRPCRoute g:"), _msg(p)

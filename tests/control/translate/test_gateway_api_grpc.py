"""GRPCRoute translation: method and metadata matches through the proxy's real route matcher
(``simulate``), on a Service (GAMMA) and on a Gateway, against the Gateway API spec and the
way Istio converts a GRPCRoute (``createGRPCURIMatch``: a method match is a ``:path`` match)."""

from __future__ import annotations

from typing import Any

import pytest

from diktyo.api import load_text
from diktyo.control.model import ProxyNode, Registry, Service, ServicePort
from diktyo.control.translate.gateway_api import bind, grpc_path_match
from diktyo.proxy.router.simulate import simulate
from diktyo.snapshot.model import Node, Snapshot, StringMatch
from diktyo.testing.translate import INGRESS_GATEWAY, translate_yaml


def registry(*names: str, port: int = 7070) -> Registry:
    return Registry(
        services=tuple(
            Service(
                hostname=f"{n}.default.svc.cluster.local",
                namespace="default",
                ports=(ServicePort(number=port, name="grpc", protocol="GRPC"),),
                short_name=n,
            )
            for n in names
        )
    )


RATINGS = registry("ratings", "ratings-v1", "ratings-v2")
SIDECAR = ProxyNode(
    node=Node(id="sleep-1.default", workload="sleep", namespace="default"), outbound_port=15001
)
GATEWAY = INGRESS_GATEWAY


def snap(text: str, proxy: ProxyNode = SIDECAR) -> Snapshot:
    return translate_yaml(text, proxy, RATINGS, "grpc.yaml", allow_warnings=False)


def to(s: Snapshot, path: str, authority: str = "ratings:7070", **md: str) -> str:
    """The backend service a gRPC call to ``path`` (metadata ``md``) is routed to."""
    headers = {"content-type": "application/grpc", "te": "trailers", **md}
    r: dict[str, Any] = simulate(s, "POST", f"{authority}{path}", headers)
    return str((r.get("destination") or {}).get("host", "")).split(".")[0] or str(r)


MESH_ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings, port: 7070}]
  rules:
  - matches:
    - headers: [{name: X-User, value: jason}]
    backendRefs: [{name: ratings-v2, port: 7070}]
  - matches:
    - method: {service: ratings.Ratings, method: Watch}
    - method: {type: RegularExpression, service: "ratings\\\\..+", method: "Rec.*"}
    backendRefs: [{name: ratings-v2, port: 7070}]
  - matches:
    - method: {service: admin.Tools}
    filters:
    - type: ExtensionRef
      extensionRef: {group: example.com, kind: Auth, name: a}
    backendRefs: [{name: ratings-v1, port: 7070}]
  - backendRefs: [{name: ratings-v1, port: 7070}]
"""


def test_method_and_metadata_matches_on_a_service() -> None:
    s = snap(MESH_ROUTE)
    assert to(s, "/ratings.Ratings/Get") == "ratings-v1"  # the rule without matches
    assert to(s, "/ratings.Ratings/Watch") == "ratings-v2"  # exact service and method
    assert to(s, "/other.Ratings/Watch") == "ratings-v1"
    assert to(s, "/ratings.Ratings/WatchMore") == "ratings-v1"  # exact is whole-path
    assert to(s, "/ratings.Ratings/Record") == "ratings-v2"  # the regex pair
    assert to(s, "/ratings.Other/Recent") == "ratings-v2"
    assert to(s, "/ratings.Ratings/Get", **{"x-user": "jason"}) == "ratings-v2"  # metadata
    assert to(s, "/ratings.Ratings/Get", **{"x-user": "bob"}) == "ratings-v1"


def test_an_unresolved_filter_answers_500_and_the_source_is_the_grpcroute() -> None:
    s = snap(MESH_ROUTE)
    r = simulate(s, "POST", "ratings:7070/admin.Tools/Reset", {"content-type": "application/grpc"})
    assert r["rule"]["kind"] == "GRPCRoute", r
    assert (r.get("directResponse") or r.get("direct_response") or {}).get("status") == 500, r


@pytest.mark.parametrize(
    ("match", "want"),
    [
        ({"service": "a.B", "method": "C"}, StringMatch(kind="exact", value="/a.B/C")),
        ({"service": "a.B"}, StringMatch(kind="prefix", value="/a.B/")),
        ({"method": "C"}, StringMatch(kind="regex", value="/[^/]+/C")),
        (
            {"type": "RegularExpression", "service": "a\\..*", "method": "C.*"},
            StringMatch(kind="regex", value="/a\\..*/C.*"),
        ),
        (
            {"type": "RegularExpression", "service": "a.B"},
            StringMatch(kind="regex", value="/a.B/.+"),
        ),
        ({"type": "RegularExpression", "method": "C"}, StringMatch(kind="regex", value="/[^/]+/C")),
    ],
)
def test_method_match_to_path_match_as_istio(match: dict[str, str], want: StringMatch) -> None:
    from diktyo.api.gateway_api import GRPCMethodMatch

    assert grpc_path_match(GRPCMethodMatch(**match)) == want


def test_precedence_exact_before_prefix_before_regex_before_metadata_only() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings}]
  rules:
  - matches: [{headers: [{name: x-user, value: jason}]}]
    backendRefs: [{name: ratings, port: 7070}]
  - matches: [{method: {type: RegularExpression, method: ".*"}}]
    backendRefs: [{name: ratings-v1, port: 7070}]
  - matches: [{method: {service: ratings.Ratings}}]
    backendRefs: [{name: ratings-v2, port: 7070}]
  - matches: [{method: {service: ratings.Ratings, method: Get}}]
    backendRefs: [{name: ratings, port: 7070}]
"""
    s = snap(text)
    jason = {"x-user": "jason"}
    assert to(s, "/ratings.Ratings/Get", **jason) == "ratings"  # exact wins over everything
    assert to(s, "/ratings.Ratings/Watch", **jason) == "ratings-v2"  # then the prefix
    assert to(s, "/x.Y/Z", **jason) == "ratings-v1"  # then the regex, before metadata only


GATEWAY_TEXT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners:
  - {name: grpc, port: 80, protocol: HTTP, hostname: "*.example.com",
     allowedRoutes: {namespaces: {from: All}}}
  - {name: web, port: 80, protocol: HTTP, hostname: "web.example.org",
     allowedRoutes: {namespaces: {from: All}, kinds: [{kind: HTTPRoute}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings}
spec:
  parentRefs: [{name: gw, namespace: istio-system}]
  hostnames: [ratings.example.com, web.example.org]
  rules:
  - matches: [{method: {service: ratings.Ratings}}]
    backendRefs: [{name: ratings-v2, port: 7070}]
"""


def test_on_a_gateway_listener_hostnames_and_allowed_kinds() -> None:
    s = snap(GATEWAY_TEXT, GATEWAY)
    assert to(s, "/ratings.Ratings/Get", "ratings.example.com") == "ratings-v2"
    # the listener whose allowedRoutes.kinds lists only HTTPRoute does not take it
    r = simulate(s, "POST", "web.example.org/ratings.Ratings/Get", {})
    assert r["virtualHost"] is None and r["rule"] is None, r
    result = load_text(GATEWAY_TEXT, "grpc.yaml")
    findings = bind(result.resources, None).findings
    assert findings == [], findings  # attached to the first listener: no condition to report


def test_reference_grant_must_name_grpcroute() -> None:
    route = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: r, namespace: test}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings, namespace: default}]
  rules: [{backendRefs: [{name: ratings-v2, namespace: default, port: 7070}]}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: g, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: KIND, namespace: test}]
  to: [{group: "", kind: Service}]
"""

    def messages(kind: str) -> list[str]:
        result = load_text(route.replace("KIND", kind), "grpc.yaml")
        return [f.message for f in bind(result.resources, RATINGS.services).findings]

    (msg,) = messages("HTTPRoute")
    assert "RefNotPermitted" in msg and "GRPCRoutes" in msg, msg
    assert messages("GRPCRoute") == []


def test_a_grpcroute_is_no_longer_ignored() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings}]
  rules: [{backendRefs: [{name: ratings-v2, port: 7070}]}]
"""
    result = load_text(text, "grpc.yaml")
    assert result.ok and result.errors == []
    assert to(snap(text), "/ratings.Ratings/Get") == "ratings-v2"


def test_explain_on_a_transparently_captured_sidecar() -> None:
    """``diktyo explain --from`` a captured sidecar: its snapshot has virtualOutbound (no
    ``outbound`` listener), whose HTTP connections route on the ``outbound`` table."""
    captured = ProxyNode(
        node=Node(
            id="sleep-1.default",
            workload="sleep",
            namespace="default",
            interception_mode="REDIRECT",
        ),
        outbound_port=0,
    )
    s = snap(MESH_ROUTE, captured)
    assert {lst.direction for lst in s.listeners} >= {"capture_outbound"}
    assert "outbound" not in {lst.direction for lst in s.listeners}
    r = simulate(s, "POST", "http://ratings:7070/ratings.Ratings/Watch", {})
    assert (r["listener"], r["routeTable"]) == ("virtualOutbound", "outbound"), r
    assert r["destination"]["host"] == "ratings-v2.default.svc.cluster.local", r

"""Istio security YAML -> SecurityConfig for one workload (selection, precedence, conversion)."""

from __future__ import annotations

from diktyo.api.loader import load_text
from diktyo.proxy.filters.authz import AuthzEngine, RequestAttributes
from diktyo.security.translate import build_security
from diktyo.snapshot.codec import decode, encode
from diktyo.snapshot.model import Node, Snapshot

REVIEWS = Node(
    id="reviews-v1-1.default", workload="reviews-v1", labels={"app": "reviews", "version": "v1"}
)
RATINGS = Node(id="ratings-v1-1.default", workload="ratings-v1", labels={"app": "ratings"})
OTHER_NS = Node(id="x.foo", workload="x", namespace="foo", labels={"app": "reviews"})

YAML = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-permissive, namespace: foo}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews-ports, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: UNSET}
  portLevelMtls:
    "9080": {mode: DISABLE}
    "9443": {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/reviews/*"]
    when:
    - key: request.headers[x-version]
      notValues: ["bad"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/8"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw-only, namespace: default}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: gw}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: https://example.com/jwks.json
    audiences: [bookinfo]
    fromHeaders: [{name: X-Jwt, prefix: "Bearer "}]
    fromParams: [token]
    forwardOriginalToken: true
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    timeout: 3s
"""


def resources():
    res = load_text(YAML, "security.yaml")
    assert res.ok, res.errors
    return res.resources


def test_reviews() -> None:
    sec = build_security(REVIEWS, resources())
    pa = sec.peer_authn
    assert pa.mode == "STRICT" and pa.source == "istio-system/default"
    assert pa.port_modes == {9080: "DISABLE", 9443: "STRICT"}
    assert pa.mode_for(9080) == "DISABLE" and pa.mode_for(1234) == "STRICT"
    names = [(p.namespace, p.name, p.action) for p in sec.authz]
    assert names == [
        ("default", "allow-nothing", "ALLOW"),
        ("default", "reviews-viewer", "ALLOW"),
        ("istio-system", "mesh-deny", "DENY"),
    ]
    viewer = sec.authz[1].rules[0]
    assert viewer.sources[0].principals == ("cluster.local/ns/default/sa/bookinfo-productpage",)
    assert viewer.operations[0].paths == ("/reviews/*",)
    assert viewer.conditions[0].not_values == ("bad",)
    (rule,) = sec.jwt_rules
    assert rule.jwks_uri == "https://example.com/jwks.json" and rule.audiences == ("bookinfo",)
    assert rule.from_headers[0].name == "x-jwt" and rule.from_params == ("token",)
    assert rule.forward_original_token and rule.timeout == 3.0 and rule.source == "default/jwt"
    # end to end through the engine
    eng = AuthzEngine(sec.authz)
    pp = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert eng.check(
        RequestAttributes(method="GET", path="/reviews/0", source_principal=pp)
    ).allowed
    assert not eng.check(
        RequestAttributes(
            method="GET", path="/reviews/0", source_principal=pp, source_ip="10.1.1.1"
        )
    ).allowed
    assert not eng.check(
        RequestAttributes(method="GET", path="/ratings/0", source_principal=pp)
    ).allowed


def test_ratings_only_gets_namespace_and_mesh_policies() -> None:
    sec = build_security(RATINGS, resources())
    assert sec.peer_authn.mode == "STRICT" and sec.peer_authn.port_modes == {}
    assert [p.name for p in sec.authz] == ["allow-nothing", "mesh-deny"]
    assert sec.jwt_rules == ()


def test_other_namespace() -> None:
    sec = build_security(OTHER_NS, resources())
    assert sec.peer_authn.mode == "PERMISSIVE" and sec.peer_authn.source == "foo/ns-permissive"
    assert [p.name for p in sec.authz] == ["mesh-deny"]


def test_defaults_and_dict_specs() -> None:
    assert build_security(REVIEWS, []).peer_authn.mode == "PERMISSIVE"

    class R:
        def __init__(self, kind: str, name: str, ns: str, spec: dict) -> None:
            self.kind, self.name, self.namespace, self.spec = kind, name, ns, spec

    sec = build_security(
        REVIEWS,
        [
            R("PeerAuthentication", "p", "default", {"mtls": {"mode": "DISABLE"}}),
            R(
                "AuthorizationPolicy",
                "a",
                "default",
                {"action": "DENY", "rules": [{"to": [{"operation": {"notMethods": ["GET"]}}]}]},
            ),
            R("VirtualService", "vs", "default", {"hosts": ["x"]}),
        ],
    )
    assert sec.peer_authn.mode == "DISABLE"
    assert sec.authz[0].rules[0].operations[0].not_methods == ("GET",)


def test_roundtrips_in_snapshot() -> None:
    snap = Snapshot(version="1", node=REVIEWS, security=build_security(REVIEWS, resources()))
    assert decode(encode(snap)) == snap

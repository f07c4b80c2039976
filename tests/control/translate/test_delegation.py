"""VirtualService delegation: Istio's validation and merge rules (pilot's mergeVirtualServicesIfNeeded)."""

from __future__ import annotations

import pytest
from translate_golden import TESTDATA, translate_case

from diktyo.api import load_text
from diktyo.api.base import StringMatch
from diktyo.api.networking import HTTPMatchRequest
from diktyo.control.model import ProxyNode, PushContext
from diktyo.control.translate import registry_from_service_entries, translate
from diktyo.control.translate.delegation import has_conflict, merge_match, string_match_conflict
from diktyo.proxy.router.simulate import format_text, simulate
from diktyo.snapshot.model import Node

REVIEWS = "reviews.default.svc.cluster.local"


def sm(**kw: str) -> StringMatch:
    return StringMatch.model_validate(kw)


@pytest.mark.parametrize(
    ("root", "leaf", "conflict"),
    [
        ({"prefix": "/a"}, {"prefix": "/a/b"}, False),
        ({"prefix": "/a/b"}, {"prefix": "/a"}, True),  # leaf is wider than root
        ({"prefix": "/a"}, {"exact": "/a/x"}, False),
        ({"prefix": "/a"}, {"exact": "/b"}, True),
        ({"exact": "/a"}, {"exact": "/a"}, False),
        ({"exact": "/a"}, {"exact": "/b"}, True),
        ({"exact": "/a"}, {"prefix": "/a"}, True),
        ({"regex": "/a.*"}, {"prefix": "/a"}, True),
        ({"prefix": "/a"}, {"regex": "/a.*"}, True),
        ({"regex": "/a.*"}, {}, True),  # a bare {} under a regex root is no subset
    ],
)
def test_string_match_conflict_follows_istio(
    root: dict[str, str], leaf: dict[str, str], conflict: bool
) -> None:
    assert string_match_conflict(sm(**root), sm(**leaf)) is conflict


def test_unset_side_never_conflicts() -> None:
    assert not string_match_conflict(None, sm(prefix="/x"))
    assert not string_match_conflict(sm(regex=".*"), None)


def _m(data: dict[str, object]) -> HTTPMatchRequest:
    return HTTPMatchRequest.model_validate(data)


def test_match_conflicts_on_ports_case_and_source() -> None:
    root = _m({"uri": {"prefix": "/api"}, "port": 9080})
    assert not has_conflict(root, _m({"uri": {"prefix": "/api/v1"}}))
    assert has_conflict(root, _m({"port": 8080}))
    assert has_conflict(root, _m({"ignoreUriCase": True}))
    # Istio: a root sourceNamespace must be repeated by the delegate match
    web = _m({"sourceNamespace": "web"})
    assert has_conflict(web, _m({"sourceNamespace": "other"}))
    assert has_conflict(web, _m({}))
    assert not has_conflict(web, _m({"sourceNamespace": "web"}))
    assert has_conflict(_m({"sourceLabels": {"app": "a"}}), _m({"sourceLabels": {"app": "b"}}))
    assert has_conflict(
        _m({"headers": {"x": {"exact": "1"}}}), _m({"headers": {"x": {"exact": "2"}}})
    )
    assert not has_conflict(
        _m({"headers": {"x": {"exact": "1"}}}), _m({"headers": {"y": {"exact": "2"}}})
    )


def test_merged_match_unites_maps_and_names_root_first() -> None:
    root = _m(
        {"name": "r", "uri": {"prefix": "/api"}, "headers": {"a": {"exact": "1"}}, "port": 80}
    )
    leaf = _m({"name": "l", "method": {"exact": "GET"}, "headers": {"b": {"exact": "2"}}})
    m = merge_match(root, leaf)
    assert m.name == "r-l"
    assert m.uri is not None and m.uri.prefix == "/api"
    assert m.method is not None and m.method.exact == "GET"
    assert set(m.headers) == {"a", "b"}
    assert m.port == 80


def _routes(snap, host=REVIEWS, port=9080, table="outbound"):  # type: ignore[no-untyped-def]
    for t in snap.route_tables:
        if t.name == table:
            for vh in t.virtual_hosts:
                if vh.name == f"{host}:{port}":
                    return vh.routes
    raise AssertionError(f"no virtual host {host}:{port}")


def test_golden_case_routes() -> None:
    snap = translate_case(TESTDATA / "delegation.in.yaml")
    routes = _routes(snap)
    assert [r.name for r in routes] == ["api-v2", "api-v1", "rest"]
    v2, v1, rest = routes
    # destinations resolved in the delegate's namespace
    assert v2.clusters[0].cluster == "outbound|9080|v2|reviews-api.team-a.svc.cluster.local"
    # the delegate's own timeout wins; the root's is inherited where the delegate sets none
    assert (v2.timeout, v1.timeout) == (1.0, 3.0)
    # root match merged into each delegate route (the delegate's uri is narrower)
    assert v2.matches[0].uri is not None and v2.matches[0].uri.value == "/api/v2"
    assert [h.name for h in v1.matches[0].headers] == ["x-team"]
    assert v1.source.delegate == "team-a/reviews-api" and v1.source.delegate_rule == 2
    assert rest.source.delegate == ""


MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 9}, labels: {version: v1}}]
"""


def _snapshot(yaml_text: str, mode: str = "standalone", labels: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    result = load_text(MESH + yaml_text)
    assert result.ok, [str(e) for e in result.errors]
    push = PushContext(
        resources=tuple(result.resources),
        registry=registry_from_service_entries(result.resources),
        version="t",
    )
    node = Node(id="n", workload="n", mode=mode, labels=labels or {})  # type: ignore[arg-type]
    return translate(ProxyNode(node=node), push)


def test_explain_names_the_delegate() -> None:
    snap = _snapshot(
        """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: [reviews.example]
  http:
  - match: [{uri: {prefix: /a}}]
    delegate: {name: leaf}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: leaf}
spec:
  http:
  - name: deep
    match: [{uri: {prefix: /a/deep}}]
    directResponse: {status: 418}
  - route: [{destination: {host: reviews.example}}]
"""
    )
    res = simulate(snap, "GET", "http://reviews.example/a/deep/x")
    assert res["delegate"] == "default/leaf"
    assert res["rule"]["delegate"]["index"] == 0
    assert res["result"] == "418 direct response"
    text = format_text(res)
    assert "via delegate default/leaf rule 0" in text
    res = simulate(snap, "GET", "http://reviews.example/a/other")
    assert res["rule"]["delegate"]["index"] == 1
    assert "via delegate default/leaf rule 0" in format_text(res)  # skipped rule named too
    # outside the root's match nothing from the delegate applies
    assert simulate(snap, "GET", "http://reviews.example/b")["rule"] is None


def test_delegate_at_a_gateway() -> None:
    snap = _snapshot(
        """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: [bookinfo.example]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /productpage}}]
    delegate: {name: pp, namespace: team}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pp, namespace: team}
spec:
  http:
  - route: [{destination: {host: reviews.example}}]
""",
        mode="gateway",
        labels={"istio": "ingressgateway"},
    )
    (route,) = _routes(snap, "bookinfo.example", 80, table="gateway-80")
    assert route.clusters[0].host == "reviews.example"
    assert route.matches[0].uri is not None and route.matches[0].uri.value == "/productpage"
    assert route.source.delegate == "team/pp"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            "spec: {hosts: [a], http: [{delegate: {name: d}, route: [{destination: {host: a}}]}]}",
            "must not specify route",
        ),
        (
            "spec: {hosts: [a], http: [{delegate: {name: d}, redirect: {uri: /x}}]}",
            "must not specify redirect",
        ),
        (
            "spec: {gateways: [gw], http: [{route: [{destination: {host: a}}]}]}",
            "delegate virtual service must have no gateways specified",
        ),
        (
            "spec: {http: [{delegate: {name: d}}]}",
            "delegate HTTP route cannot contain delegate",
        ),
        (
            "spec: {tcp: [{route: [{destination: {host: a}}]}]}",
            "must have no tcp route specified",
        ),
        ("spec: {http: [{match: [{uri: {prefix: /}}]}]}", "HTTP route or redirect is required"),
    ],
)
def test_istio_delegate_validation(doc: str, message: str) -> None:
    result = load_text(
        f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\n{doc}\n"
    )
    assert not result.ok
    assert any(message in e.message for e in result.errors), [str(e) for e in result.errors]


def test_delegate_without_hosts_loads() -> None:
    result = load_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\n"
        "spec: {http: [{route: [{destination: {host: a}}]}]}\n"
    )
    assert result.ok, [str(e) for e in result.errors]

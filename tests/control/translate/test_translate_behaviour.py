"""translate: behaviour checks beside the goldens (what Istio's docs promise for each case)."""

from __future__ import annotations

from translate_golden import TESTDATA, translate_case

from diktyo.api import load_text
from diktyo.control.model import ProxyNode, PushContext, Registry
from diktyo.control.translate import registry_from_service_entries, translate
from diktyo.snapshot import from_builtins, to_builtins
from diktyo.snapshot.model import Node, Snapshot, VirtualHost

REVIEWS = "reviews.default.svc.cluster.local"


def vhost(snap: Snapshot, name: str, table: str = "outbound") -> VirtualHost:
    for t in snap.route_tables:
        if t.name == table:
            for vh in t.virtual_hosts:
                if vh.name == name:
                    return vh
    raise AssertionError(f"no virtual host {name} in {table}")


def test_all_v1_routes_every_service_to_its_v1_subset() -> None:
    snap = translate_case(TESTDATA / "bookinfo-all-v1.in.yaml")
    for svc in ("productpage", "reviews", "ratings", "details"):
        (route,) = vhost(snap, f"{svc}.default.svc.cluster.local:9080").routes
        (wc,) = route.clusters
        assert (wc.cluster, wc.weight) == (f"outbound|9080|v1|{svc}.default.svc.cluster.local", 100)
        assert route.timeout is None and route.retries is None
    clusters = {c.name: c for c in snap.clusters}
    v3 = clusters[f"outbound|9080|v3|{REVIEWS}"]
    assert [e.labels["version"] for e in v3.endpoints] == ["v3"]
    assert v3.endpoints[0].principal == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    inbound = clusters["inbound|9080||"]
    assert inbound.direction == "inbound"
    assert [(e.address, e.port) for e in inbound.endpoints] == [("127.0.0.1", 9081)]
    listeners = {lst.name: lst for lst in snap.listeners}
    assert listeners["outbound"].port == 15001
    assert listeners["inbound|9080"].port == 15006


def test_domains_cover_every_spelling() -> None:
    snap = translate_case(TESTDATA / "bookinfo-all-v1.in.yaml")
    domains = set(vhost(snap, f"{REVIEWS}:9080").domains)
    for name in ("reviews", "reviews.default", "reviews.default.svc", REVIEWS):
        assert f"{name}:9080" in domains and name in domains


def test_jason_goes_to_v2_first_rule_wins() -> None:
    snap = translate_case(TESTDATA / "reviews-jason.in.yaml")
    first, second = vhost(snap, f"{REVIEWS}:9080").routes
    (m,) = first.matches
    (h,) = m.headers
    assert (h.name, h.match.kind, h.match.value) == ("end-user", "exact", "jason")
    assert first.clusters[0].subset == "v2" and second.clusters[0].subset == "v1"
    assert second.matches == ()
    assert first.source.name == "reviews" and first.source.rule_name == "jason-to-v2"
    assert first.source.file.endswith("virtual-service-reviews-test-v2.yaml")
    assert first.source.line == 11  # the "- name: jason-to-v2" line


def test_fault_and_legacy_percent() -> None:
    snap = translate_case(TESTDATA / "fault-delay-abort.in.yaml")
    route = vhost(snap, "ratings.default.svc.cluster.local:9080").routes[0]
    assert route.fault is not None and route.fault.delay is not None
    assert (route.fault.delay.fixed_delay, route.fault.delay.percentage) == (7.0, 100.0)
    (details,) = vhost(snap, "details.default.svc.cluster.local:9080").routes
    assert details.fault is not None and details.fault.abort is not None
    assert (details.fault.abort.http_status, details.fault.abort.percentage) == (503, 10.0)
    assert details.fault.delay is not None and details.fault.delay.fixed_delay == 0.1


def test_retries_none_zero_and_explicit() -> None:
    snap = translate_case(TESTDATA / "retries-timeouts.in.yaml")
    (reviews,) = vhost(snap, f"{REVIEWS}:9080").routes
    assert reviews.timeout == 0.5 and reviews.retries is None
    off, explicit, default = vhost(snap, "ratings.default.svc.cluster.local:9080").routes
    assert off.retries is not None and off.retries.attempts == 0
    assert default.retries is None and default.timeout is None
    r = explicit.retries
    assert r is not None and r.attempts == 3 and r.per_try_timeout == 0.5
    assert r.retry_on == ("gateway-error", "connect-failure", "retriable-status-codes")
    assert r.retriable_status_codes == (503, 429)
    assert explicit.timeout == 3.0


def test_weights_50_50() -> None:
    snap = translate_case(TESTDATA / "reviews-50-v3.in.yaml")
    (route,) = vhost(snap, f"{REVIEWS}:9080").routes
    assert [(c.subset, c.weight) for c in route.clusters] == [("v1", 50), ("v3", 50)]


def test_source_labels_decided_for_this_proxy() -> None:
    snap = translate_case(TESTDATA / "actions-and-sources.in.yaml")
    routes = vhost(snap, f"{REVIEWS}:9080").routes
    assert [r.name for r in routes] == ["mixed", "old-path", "gone", "mirrored"]
    (m,) = routes[0].matches
    assert m.uri is not None and m.uri.value == "/v2" and m.source_labels == {}
    assert routes[1].redirect is not None and routes[1].redirect.code == 301
    assert routes[2].direct_response is not None and routes[2].direct_response.status == 410
    assert routes[3].mirrors[0].percentage == 25.0


def test_gateway_listener_and_table() -> None:
    snap = translate_case(TESTDATA / "gateway.in.yaml")
    gw = [lst for lst in snap.listeners if lst.direction == "gateway"]
    assert [(lst.name, lst.port, lst.route_table) for lst in gw] == [
        ("gateway-8080", 18080, "gateway-8080")
    ]
    vh = vhost(snap, "*:8080", table="gateway-8080")
    assert vh.domains == ("*",)
    (route,) = vh.routes
    assert len(route.matches) == 5
    assert route.clusters[0].cluster == "outbound|9080||productpage.default.svc.cluster.local"
    # the mesh table does not carry the gateway-bound VirtualService
    assert all(r.source.name != "bookinfo" for r in vhost(snap, f"{REVIEWS}:9080").routes)


def test_gateway_mode_for_a_sidecar_has_no_gateway_listener() -> None:
    _proxy, push = _case("gateway.in.yaml")
    node = Node(id="x", workload="x", labels={"istio": "ingressgateway"}, mode="sidecar")
    snap = translate(ProxyNode(node=node, outbound_port=1), push)
    assert [lst.direction for lst in snap.listeners] == ["outbound"]


def test_unknown_subset_and_host_get_empty_clusters() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
      weight: 50
    - destination: {host: nowhere.example.com, port: {number: 8000}}
      weight: 50
"""
    result = load_text(text, "vs.yaml")
    assert result.errors == []
    from diktyo.control.model import Service, ServicePort

    registry = Registry(
        services=(
            Service(hostname=REVIEWS, ports=(ServicePort(number=9080),), short_name="reviews"),
        )
    )
    node = Node(id="a", workload="a")
    snap = translate(
        ProxyNode(node=node, outbound_port=15001),
        PushContext(resources=tuple(result.resources), registry=registry),
    )
    from_builtins(to_builtins(snap))
    clusters = {c.name: c for c in snap.clusters}
    assert clusters[f"outbound|9080|v9|{REVIEWS}"].endpoints == ()
    assert clusters["outbound|8000||nowhere.example.com"].endpoints == ()


def test_registry_from_service_entries() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.shop.example, api]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 8080, name: http-api}
  - {number: 9000, name: grpc, protocol: GRPC, targetPort: 9001}
  endpoints:
  - address: 10.0.0.1
    ports: {http-api: 18080}
    labels: {app: api, version: v1}
    serviceAccount: api-sa
  - address: 10.0.0.2
"""
    reg = registry_from_service_entries(load_text(text, "se.yaml").resources)
    assert [s.hostname for s in reg.services] == ["api.shop.example", "api.shop.svc.cluster.local"]
    assert reg.services[0].short_name == "" and reg.services[1].short_name == "api"
    assert [(p.number, p.protocol) for p in reg.services[0].ports] == [
        (8080, "HTTP"),
        (9000, "GRPC"),
    ]
    a, b = reg.instances
    assert a.ports == {8080: 18080, 9000: 9001} and a.workload == "api-v1"
    assert not a.has_sidecar and a.service_account == "api-sa" and a.namespace == "shop"
    assert b.ports == {8080: 8080, 9000: 9001}


def _case(name: str) -> tuple[ProxyNode, PushContext]:
    from translate_golden import build_case

    return build_case(TESTDATA / name)


def test_translate_is_pure() -> None:
    proxy, push = _case("actions-and-sources.in.yaml")
    assert translate(proxy, push) == translate(proxy, push)


def test_fault_without_percentage_is_never_injected_like_istio() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [reviews]
  http:
  - fault:
      abort: {httpStatus: 418}
      delay: {fixedDelay: 1s}
    route:
    - destination: {host: reviews}
"""
    result = load_text(text, "vs.yaml")
    from diktyo.control.translate.routes import fault

    spec = result.resources[0].spec
    f = fault(spec.http[0].fault)  # type: ignore[attr-defined]
    assert f is not None and f.abort is not None and f.delay is not None
    assert f.abort.percentage == 0.0 and f.delay.percentage == 0.0


def test_outlier_detection_mapping_follows_istio() -> None:
    from diktyo.api.networking import OutlierDetection as OD
    from diktyo.control.translate.clusters import outlier_detection

    def od(**kw: object) -> tuple[object, object, float]:
        out = outlier_detection(OD.model_validate(kw))
        assert out is not None
        return out.consecutive_5xx_errors, out.consecutive_gateway_errors, out.max_ejection_percent

    assert od() == (5, None, 10.0)
    assert od(consecutive5xxErrors=0) == (None, None, 10.0)
    assert od(consecutiveErrors=3) == (None, 3, 10.0)  # legacy: gateway errors only
    assert od(consecutiveErrors=3, consecutive5xxErrors=7) == (7, 3, 10.0)
    assert od(consecutiveGatewayErrors=2, maxEjectionPercent=100) == (5, 2, 100.0)
    assert od(maxEjectionPercent=0) == (5, None, 10.0)
    assert outlier_detection(None) is None


def test_security_policies_for_this_workload_are_in_the_snapshot() -> None:
    text = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to: [{operation: {methods: [POST]}}]
"""
    result = load_text(text, "sec.yaml")
    assert result.errors == []
    push = PushContext(resources=tuple(result.resources), registry=Registry())
    reviews = Node(id="r", workload="reviews-v1", labels={"app": "reviews"})
    snap = translate(ProxyNode(node=reviews, outbound_port=1), push)
    assert from_builtins(to_builtins(snap)) == snap
    assert snap.security.peer_authn.mode == "STRICT"
    assert [p.action for p in snap.security.authz] == ["DENY"]
    other = translate(ProxyNode(node=Node(id="o", workload="ratings-v1"), outbound_port=1), push)
    assert other.security.peer_authn.mode == "PERMISSIVE" and other.security.authz == ()


def test_dns_service_entry_without_endpoints_dials_the_host() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [httpbin.org, example.com]
  resolution: DNS
  ports:
  - {number: 80, name: http}
  - {number: 443, name: tls, protocol: TLS}
"""
    reg = registry_from_service_entries(load_text(text, "se.yaml").resources)
    assert [(i.address, i.ports, i.services) for i in reg.instances] == [
        ("httpbin.org", {80: 80, 443: 443}, ("httpbin.org",)),
        ("example.com", {80: 80, 443: 443}, ("example.com",)),
    ]


def test_local_port_with_short_name_resolves_in_the_node_namespace() -> None:
    from diktyo.control.model import Service, ServicePort

    registry = Registry(
        services=(
            Service(
                hostname="pg.default.svc.cluster.local",
                ports=(ServicePort(5432, name="tcp-pg", protocol="TCP"),),
                short_name="pg",
            ),
        )
    )
    node = Node(id="a", workload="a")
    snap = translate(
        ProxyNode(node=node, local_ports={"pg:5432": 15432}),
        PushContext(resources=(), registry=registry),
    )
    (lst,) = snap.listeners
    assert (lst.direction, lst.cluster) == ("tcp", "outbound|5432||pg.default.svc.cluster.local")


def test_virtual_service_host_without_a_service_is_routed_on_port_80() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: teapot}
spec:
  hosts: [teapot.example.com, legacy]
  http:
  - directResponse: {status: 418, body: {string: "I'm a teapot"}}
"""
    result = load_text(text, "vs.yaml")
    snap = translate(
        ProxyNode(node=Node(id="a", workload="a"), outbound_port=1),
        PushContext(resources=tuple(result.resources), registry=Registry()),
    )
    from_builtins(to_builtins(snap))
    vh = vhost(snap, "teapot.example.com:80")
    assert vh.domains == ("teapot.example.com:80", "teapot.example.com")
    (route,) = vh.routes
    assert route.direct_response is not None and route.direct_response.status == 418
    legacy = vhost(snap, "legacy.default.svc.cluster.local:80")
    assert "legacy" in legacy.domains and "legacy.default:80" in legacy.domains


def test_sidecar_egress_scope_and_selection() -> None:
    proxy, push = _case("sidecar-egress.in.yaml")
    snap = translate(proxy, push)
    names = [vh.name for vh in snap.route_tables[0].virtual_hosts]
    assert names == ["reviews.default.svc.cluster.local:9080", "cart.shop.svc.cluster.local:8080"]
    assert {c.name for c in snap.clusters} == {
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|8080||cart.shop.svc.cluster.local",
    }
    # another workload falls back to the root namespace's Sidecar: sees everything
    other = ProxyNode(node=Node(id="r", workload="reviews-v1", labels={"app": "reviews"}))
    hosts = {vh.name for vh in translate(other, push).route_tables[0].virtual_hosts}
    assert "details.default.svc.cluster.local:9080" in hosts and len(hosts) == 5
    # gateways ignore Sidecar resources
    gw = ProxyNode(node=Node(id="g", workload="gw", labels={"app": "productpage"}, mode="gateway"))
    assert len(translate(gw, push).route_tables[0].virtual_hosts) == 5


def test_gateway_https_redirect() -> None:
    text = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["shop.example.com"]
    tls: {httpsRedirect: true}
"""
    result = load_text(text, "gw.yaml")
    node = Node(id="g", workload="gw", labels={"istio": "ingressgateway"}, mode="gateway")
    snap = translate(
        ProxyNode(node=node), PushContext(resources=tuple(result.resources), registry=Registry())
    )
    from_builtins(to_builtins(snap))
    vh = vhost(snap, "shop.example.com:80", table="gateway-80")
    (route,) = vh.routes
    assert route.redirect is not None and (route.redirect.scheme, route.redirect.code) == (
        "https",
        301,
    )

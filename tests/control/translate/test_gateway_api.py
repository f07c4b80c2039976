"""Gateway API translation: HTTPRoutes on a Gateway and on a Service (GAMMA), run through the
proxy's real route matcher (``simulate``), against what the Gateway API spec and Istio promise."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from random import Random

import pytest

from diktyo.api import load_paths, load_text
from diktyo.control.model import ProxyNode, PushContext, Registry, Service, ServicePort
from diktyo.control.translate import translate
from diktyo.control.translate.gateway_api import bind
from diktyo.proxy.router.matcher import RequestInfo, RouteMatcher
from diktyo.proxy.router.simulate import format_text, simulate
from diktyo.snapshot.codec import validate
from diktyo.snapshot.model import Node, Snapshot
from diktyo.testing.translate import INGRESS_GATEWAY, translate_yaml

ISTIO_SAMPLES = Path(__file__).resolve().parents[3] / ".." / "shared" / "istio" / "samples"
BOOKINFO_GW_API = ISTIO_SAMPLES / "bookinfo" / "gateway-api"


def registry(*names: str, port: int = 9080, namespace: str = "default") -> Registry:
    services = []
    for n in names:
        ns = namespace
        if "." in n:
            n, ns = n.split(".")
        services.append(
            Service(
                hostname=f"{n}.{ns}.svc.cluster.local",
                namespace=ns,
                ports=(ServicePort(number=port),),
                short_name=n,
            )
        )
    return Registry(services=tuple(services))


BOOKINFO = registry(
    "productpage", "reviews", "ratings", "details",
    "productpage-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "details-v1",
)  # fmt: skip

GATEWAY = INGRESS_GATEWAY
SIDECAR = ProxyNode(
    node=Node(id="productpage-v1-1.default", workload="productpage-v1", namespace="default"),
    outbound_port=15001,
)


def snap(text: str, proxy: ProxyNode = GATEWAY, reg: Registry = BOOKINFO) -> Snapshot:
    return translate_yaml(text, proxy, reg)


def route_of(s: Snapshot, url: str, method: str = "GET", **headers: str) -> dict:
    return simulate(s, method, url, headers)


GW = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
---
"""


def test_bookinfo_gateway_sample_routes_only_the_listed_paths() -> None:
    s = snap((BOOKINFO_GW_API / "bookinfo-gateway.yaml").read_text())
    assert [lst.name for lst in s.listeners if lst.direction == "gateway"] == ["gateway-80"]
    for path in ("/productpage", "/static/x.css", "/static", "/login", "/logout",
                 "/api/v1/products", "/api/v1/products/0/reviews"):  # fmt: skip
        r = route_of(s, f"127.0.0.1:8080{path}")
        assert r["result"] == "forward", (path, r["result"])
        assert r["destination"] == {
            "host": "productpage.default.svc.cluster.local", "subset": "", "port": 9080
        }  # fmt: skip
        assert r["rule"]["virtualService"] is not None
    for path in ("/", "/productpage/x", "/staticx", "/api/v1/productsx", "/loginx"):
        assert route_of(s, f"127.0.0.1:8080{path}")["result"] == "404 NR: no route matched", path


def test_route_source_names_the_httproute_rule() -> None:
    s = snap((BOOKINFO_GW_API / "bookinfo-gateway.yaml").read_text())
    table = next(t for t in s.route_tables if t.name == "gateway-80")
    src = table.virtual_hosts[0].routes[0].source
    assert (src.kind, src.name, src.namespace, src.rule) == ("HTTPRoute", "bookinfo", "default", 0)
    assert src.line == 23  # "  - matches:" in bookinfo-gateway.yaml
    text = format_text(route_of(s, "127.0.0.1:8080/login"))
    assert "matched rule 0 '' of HTTPRoute default/bookinfo at " in text, text
    assert "test.yaml:23 (match block 0)" in text, text


def test_precedence_across_rules_and_routes() -> None:
    """Exact > longest prefix > method > more headers > more query params, whatever the order."""
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{name: ratings, port: 9080}]          # PathPrefix / (default)
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: details, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: reviews-v1, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-user, value: jason}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches:
    - path: {type: PathPrefix, value: /api/v1/}   # trailing '/' ignored
    backendRefs: [{name: reviews-v3, port: 9080}]
  - matches: [{path: {type: Exact, value: /api}}]
    backendRefs: [{name: productpage, port: 9080}]
"""
    )

    def host(path: str, method: str = "GET", **h: str) -> str:
        return route_of(s, f"gw.example{path}", method, **h)["destination"]["host"].split(".")[0]

    assert host("/api") == "productpage"  # Exact wins over every prefix
    assert host("/api/v1") == "reviews-v3"  # longest prefix; "/api/v1/" == "/api/v1"
    assert host("/api/v1/x") == "reviews-v3"
    assert host("/api/x", "POST", **{"x-user": "jason"}) == "reviews-v1"  # method > headers
    assert host("/api/x", **{"x-user": "jason"}) == "reviews-v2"
    assert host("/api/x") == "details"
    assert host("/apix") == "ratings"  # path-separated prefix: /api does not match /apix
    assert host("/") == "ratings"


def test_header_query_regex_and_method_matches() -> None:
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  hostnames: [bookinfo.example.com]
  rules:
  - matches:
    - path: {type: RegularExpression, value: "/reviews/[0-9]+"}
      queryParams: [{name: v, value: "3"}]
      headers: [{type: RegularExpression, name: X-Env, value: "prod|stage"}]
    backendRefs: [{name: reviews-v3, port: 9080}]
  - matches: [{method: DELETE}]
    backendRefs: [{name: reviews-v2, port: 9080}]
"""
    )
    url = "bookinfo.example.com/reviews/12?v=3"
    assert route_of(s, url, **{"x-env": "stage"})["destination"]["host"].startswith("reviews-v3")
    assert route_of(s, url, **{"x-env": "dev"})["result"].startswith("404 NR")
    assert route_of(s, "bookinfo.example.com/reviews/1?v=2", **{"x-env": "prod"})[
        "result"
    ].startswith("404 NR")
    assert route_of(s, "bookinfo.example.com/reviews/1x?v=3", **{"x-env": "prod"})[
        "result"
    ].startswith("404 NR")  # the regex must match the whole path
    assert route_of(s, "bookinfo.example.com/x", "DELETE")["destination"]["host"].startswith(
        "reviews-v2"
    )
    # the route's hostname is the virtual host: another Host gets 404
    assert route_of(s, "other.example.com/x")["result"].startswith("404 NR")
    assert route_of(s, "bookinfo.example.com:80/x", "DELETE")["result"] == "forward"


def test_regular_expression_paths_rank_below_prefixes_as_in_istio() -> None:
    """Regex precedence is implementation-specific; Istio ranks Exact > PathPrefix > regex."""
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "/api/.*"}}]
    backendRefs: [{name: reviews-v3, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
"""
    )
    assert route_of(s, "x/api/1")["destination"]["host"].startswith("reviews-v1")


def test_filters_headers_rewrite_redirect_mirror() -> None:
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Env, value: prod}]
        add: [{name: X-Tag, value: a}]
        remove: [x-debug]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Served-By, value: diktyo}]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-v3, port: 9080}, percent: 25}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /strip}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: reviews-v2, port: 9080}]
"""
    )
    r = route_of(s, "gw.example/old/page")
    assert r["result"] == "301 redirect"
    assert r["redirect"]["scheme"] == "https" and r["redirect"]["authority"] == "new.example.com"
    assert r["redirect"]["port"] == 443  # the scheme's well-known port (the Location omits it)
    assert r["redirect"].get("uri") is None  # path kept
    r = route_of(s, "gw.example/v1/books?id=1")
    assert r["rewrittenPath"] == "/v2/books?id=1"
    assert r["rewrite"]["authority"] == "internal.example"
    assert r["headers"]["request"] == {
        "set": {"X-Env": "prod"}, "add": {"X-Tag": "a"}, "remove": ("x-debug",)
    }  # fmt: skip
    assert r["headers"]["response"]["set"] == {"X-Served-By": "diktyo"}
    (m,) = r["mirror"]
    assert m["host"] == "reviews-v3.default.svc.cluster.local" and m["percentage"] == 25.0
    assert route_of(s, "gw.example/v1")["rewrittenPath"] == "/v2"
    assert route_of(s, "gw.example/v1/")["rewrittenPath"] == "/v2/"
    assert route_of(s, "gw.example/full/a/b?q=1")["rewrittenPath"] == "/replaced?q=1"
    assert route_of(s, "gw.example/strip/a/b")["rewrittenPath"] == "/a/b"
    assert route_of(s, "gw.example/strip")["rewrittenPath"] == "/"
    clusters = {c.name for c in s.clusters}
    assert "outbound|9080||reviews-v3.default.svc.cluster.local" in clusters  # mirror target


def test_weights_and_invalid_backends() -> None:
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {value: /split}}]
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    - {name: reviews-v3, port: 9080, weight: 0}
  - matches: [{path: {value: /missing}}]
    backendRefs: [{name: nosuch, port: 9080}]
  - matches: [{path: {value: /other-ns}}]
    backendRefs: [{name: reviews, namespace: prod, port: 9080}]
  - matches: [{path: {value: /none}}]
  - matches: [{path: {value: /mixed}}]
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 1}
    - {name: nosuch, port: 9080, weight: 3}
"""
    )
    r = route_of(s, "gw.example/split")
    assert [(d["host"].split(".")[0], d["weight"]) for d in r["destinations"]] == [
        ("reviews-v1", 90.0), ("reviews-v2", 10.0)
    ]  # fmt: skip
    for path in ("/missing", "/other-ns", "/none"):
        assert route_of(s, f"gw.example{path}")["result"] == "500 direct response", path
    # a valid and an invalid backend: the invalid one's share goes to an empty cluster
    r = route_of(s, "gw.example/mixed")
    assert r["result"] == "forward"
    assert [(d["host"], d["weight"]) for d in r["destinations"]] == [
        ("reviews-v1.default.svc.cluster.local", 25.0),
        ("nosuch.default.gateway-api.invalid", 75.0),
    ]
    assert r["endpoints"] == []  # the best-weighted destination is the empty cluster


def test_reference_grant_permits_cross_namespace_backend() -> None:
    route = (
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{name: reviews, namespace: prod, port: 9080}]
"""
    )
    grant = """
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow-default, namespace: prod}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service}]
"""
    reg = registry("reviews.prod")
    assert route_of(snap(route, reg=reg), "x/")["result"] == "500 direct response"
    r = route_of(snap(route + grant, reg=reg), "x/")
    assert r["result"] == "forward"
    assert r["destination"]["host"] == "reviews.prod.svc.cluster.local"
    # a grant in the wrong namespace, or for another name, does not help
    other = grant.replace("namespace: prod", "namespace: default").replace(
        "kind: Service}]", "kind: Service, name: ratings}]"
    )
    assert route_of(snap(route + other, reg=reg), "x/")["result"] == "500 direct response"


def test_listener_hostname_intersection_and_allowed_namespaces() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: infra}
spec:
  gatewayClassName: istio
  listeners:
  - {name: wild, port: 80, protocol: HTTP, hostname: "*.example.com",
     allowedRoutes: {namespaces: {from: All}}}
  - {name: same, port: 80, protocol: HTTP, hostname: internal.local}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw, namespace: infra}]
  hostnames: [shop.example.com, internal.local, other.org]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
"""
    s = snap(text)
    assert route_of(s, "shop.example.com/")["result"] == "forward"
    # internal.local is on a listener that admits only routes from namespace infra
    assert route_of(s, "internal.local/")["result"].startswith("404 NR")
    assert route_of(s, "other.org/")["result"].startswith("404 NR")


def test_gateway_served_only_by_the_ingress_gateway_and_not_other_classes() -> None:
    text = (
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
"""
    )
    egress = ProxyNode(
        node=Node(
            id="egress.istio-system",
            workload="egress",
            namespace="istio-system",
            labels={"istio": "egressgateway"},
            mode="gateway",
        ),
    )
    assert not [lst for lst in snap(text, egress).listeners if lst.direction == "gateway"]
    named = ProxyNode(
        node=Node(
            id="gw-istio.default",
            workload="gw-istio",
            namespace="default",
            labels={"gateway.networking.k8s.io/gateway-name": "gw"},
            mode="gateway",
        ),
    )
    assert [lst.name for lst in snap(text, named).listeners if lst.direction == "gateway"] == [
        "gateway-80"
    ]
    waypoint = text.replace("gatewayClassName: istio", "gatewayClassName: istio-waypoint")
    assert not [lst for lst in snap(waypoint).listeners if lst.direction == "gateway"]


def test_istio_gateway_and_gateway_api_share_a_port() -> None:
    text = (
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  hostnames: [api.example.com]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [web.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.example.com]
  gateways: [gw]
  http: [{route: [{destination: {host: ratings}}]}]
"""
    )
    s = snap(text)
    assert [lst.name for lst in s.listeners if lst.direction == "gateway"] == ["gateway-80"]
    assert route_of(s, "web.example.com/")["destination"]["host"].startswith("ratings.")
    assert route_of(s, "api.example.com/")["destination"]["host"].startswith("reviews.")


# --------------------------------------------------------------------------- GAMMA (mesh)


def test_gamma_route_reviews_v1_sample_for_sidecars() -> None:
    s = snap((BOOKINFO_GW_API / "route-reviews-v1.yaml").read_text(), SIDECAR)
    r = route_of(s, "reviews:9080/reviews/0")
    assert r["destination"]["host"] == "reviews-v1.default.svc.cluster.local"
    assert r["rule"]["virtualService"] is not None
    # other services keep their default route
    assert route_of(s, "ratings:9080/x")["destination"]["host"].startswith("ratings.")


def test_gamma_90_10_split_in_the_real_matcher() -> None:
    s = snap((BOOKINFO_GW_API / "route-reviews-90-10.yaml").read_text(), SIDECAR)
    table = next(t for t in s.route_tables if t.name == "outbound")
    matcher = RouteMatcher(table)
    info = RequestInfo("GET", "/reviews/0", "reviews:9080", {}, "http")
    cvh = matcher.find_virtual_host("reviews:9080")
    assert cvh is not None
    (cr,) = cvh.routes
    rng = Random(7)
    seen = Counter(cr.pick(rng).wc.host.split(".")[0] for _ in range(10000))  # type: ignore[union-attr]
    assert matcher.select(info) == (cvh, cr, 0)
    assert set(seen) == {"reviews-v1", "reviews-v2"}
    assert 850 <= seen["reviews-v2"] <= 1150  # 10 % of 10000, +-5 sd


def test_gamma_port_and_consumer_routes() -> None:
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: test}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, namespace: default}]
  rules: [{backendRefs: [{name: reviews-v3, namespace: default, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: test-to-default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: test}]
  to: [{group: "", kind: Service}]
"""
    s = snap(text, SIDECAR)
    assert route_of(s, "reviews:9080/")["destination"]["host"].startswith("reviews-v1.")
    tester = ProxyNode(
        node=Node(id="sleep-1.test", workload="sleep", namespace="test"), outbound_port=15001
    )
    s = snap(text, tester)
    r = route_of(s, "reviews.default:9080/")
    assert r["destination"]["host"].startswith("reviews-v3."), r


def test_gamma_route_replaces_virtual_service_for_the_service() -> None:
    text = (
        (BOOKINFO_GW_API / "route-reviews-v3.yaml").read_text()
        + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
"""
    )
    r = route_of(snap(text, SIDECAR), "reviews:9080/")
    assert r["destination"]["host"] == "reviews-v3.default.svc.cluster.local"


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(ISTIO_SAMPLES)) for p in ISTIO_SAMPLES.glob("*/gateway-api/*.yaml")),
)
def test_every_gateway_api_sample_of_istio_translates_to_a_valid_snapshot(path: str) -> None:
    result = load_paths([ISTIO_SAMPLES / path])
    assert result.ok, [str(e) for e in result.errors]
    # the Gateways of the sample's folder (helloworld-route.yaml's is in another file)
    folder = load_paths([(ISTIO_SAMPLES / path).parent]).resources
    result.resources += [
        r for r in folder if r.qualified_kind == "Gateway.gateway.networking.k8s.io"
        and all(x.key != r.key for x in result.resources)
    ]  # fmt: skip
    reg = Registry(
        services=BOOKINFO.services
        + registry("httpbin", port=8000).services
        + registry("helloworld", "helloworld-v1", "helloworld-v2", port=5000).services
    )
    for proxy in (GATEWAY, SIDECAR):
        out = translate(proxy, PushContext(resources=tuple(result.resources), registry=reg))
        assert validate(out) == []
    gidx = bind(result.resources, reg.services)
    assert [f.message for f in gidx.findings if f.severity == "error"] == []


def test_timeouts_become_route_and_per_try_timeouts() -> None:
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - backendRefs: [{name: reviews, port: 9080}]
    timeouts: {request: 1s, backendRequest: 500ms}
"""
    )
    r = route_of(s, "x/")
    assert r["timeout"] == 1.0 and r["retries"]["per_try_timeout"] == 0.5


def test_redirect_replace_prefix_match_uses_the_proxy_prefix_rewrite() -> None:
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old/}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
"""
    )
    exact = route_of(s, "x/old")
    assert exact["redirect"]["uri"] == "/new" and exact["redirect"]["code"] == 302
    below = route_of(s, "x/old/a")
    assert below["redirect"].get("uri") is None
    assert below["redirect"]["prefix_rewrite"] == "/new/"  # for the matched prefix "/old/"
    assert route_of(s, "x/older")["result"].startswith("404 NR")


def test_shared_translation_equals_translate() -> None:
    """One generator shared across proxies gives what a fresh one (translate) gives each."""
    from diktyo.control.translate.cache import PushTranslator
    from diktyo.snapshot import encode

    text = (BOOKINFO_GW_API / "bookinfo-gateway.yaml").read_text() + "\n---\n"
    text += (BOOKINFO_GW_API / "route-reviews-90-10.yaml").read_text()
    result = load_text(text, "t.yaml")
    push = PushContext(resources=tuple(result.resources), registry=BOOKINFO)
    shared = PushTranslator()
    for proxy in (SIDECAR, GATEWAY, SIDECAR):
        assert shared(proxy, push) == translate(proxy, push)
        built = shared.build(proxy, push)
        assert b"".join(built.parts()) == encode(built.snapshot)


def test_trailing_slash_does_not_lengthen_a_prefix() -> None:
    """"/a/" is the prefix "/a": equal length, so the match with a header goes first."""
    s = snap(
        GW
        + """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a/}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x-v, value: "2"}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
"""
    )
    assert route_of(s, "x/a/b", **{"x-v": "2"})["destination"]["host"].startswith("reviews-v2.")
    assert route_of(s, "x/a/b")["destination"]["host"].startswith("reviews-v1.")

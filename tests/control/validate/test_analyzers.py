"""One config and its expected findings per analyzer, written from Istio's documented
behaviour (its analysis message reference and analyzer tests): which code is reported, on
which resource(s). As in Istio's analyzer tests, a case lists ``(code, "Kind ns/name")``
pairs and only the codes of the analyzer under test are compared (as a multiset)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from diktyo.api import load_text
from diktyo.api.resource import Resource
from diktyo.control.model import Registry, Service, ServicePort, WorkloadInstance
from diktyo.control.validate import Finding, analyze, registry_for_hosts


def load(text: str) -> list[Resource]:
    result = load_text(text, "in.yaml")
    errors = [str(e) for e in result.errors if e.severity == "error"]
    assert errors == []
    return list(result.resources)


def kube_service(name: str, namespace: str, ports: list[tuple[str | None, int]]) -> Resource:
    """A Kubernetes Service: loaded from YAML when the loader reads Services, else built."""
    port_yaml = "".join(f"  - {{port: {n}{', name: ' + pn if pn else ''}}}\n" for pn, n in ports)
    text = (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  selector: {{app: {name}}}\n  ports:\n{port_yaml}"
    )
    loaded = [r for r in load_text(text, "svc.yaml").resources if r.kind == "Service"]
    if loaded:
        return loaded[0]
    spec = SimpleNamespace(
        type="ClusterIP",
        selector={"app": name},
        ports=[
            SimpleNamespace(name=pn, port=n, protocol="TCP", app_protocol=None, target_port=None)
            for pn, n in ports
        ],
    )
    return Resource("Service", "v1", name, namespace, spec, "svc.yaml", 1, 1)  # type: ignore[arg-type]


def found(problems: list[Finding], codes: set[str]) -> Counter[tuple[str, str]]:
    return Counter((p.code, p.origin) for p in problems if p.code in codes)


def expect(problems: list[Finding], codes: set[str], *expected: tuple[str, str]) -> None:
    got = found(problems, codes)
    want = Counter(expected)
    assert got == want, "\n".join(str(p) for p in problems)


def vs(name: str, ns: str, hosts: list[str], extra: str = "", dest: str = "productpage") -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: {hosts!r}\n{extra}"
        f"  http:\n  - route:\n    - destination: {{host: {dest}}}\n---\n"
    )


# ----------------------------------------------------------------------------- IST0109


def test_conflicting_mesh_gateway_hosts() -> None:
    text = (
        vs("productpage", "foo", ["productpage"])
        + vs("bogus-productpage", "foo", ["productpage"])
        + vs("reviews", "foo", ["reviews"])
        # same host, but bound to an ingress gateway only: no conflict
        + vs("reviews", "bar", ["reviews.foo.svc.cluster.local"], "  gateways: [ingress]\n")
        + vs("ratings", "foo", ["ratings"], "  gateways: [mesh]\n")
        + vs(
            "ratings",
            "bar",
            ["ratings.foo.svc.cluster.local", "google.com"],
            "  gateways: [ingress, mesh]\n",
        )
        # exported to its own namespace only: no conflict with team2's copy of the host
        + vs("ratings", "team1", ["ratings"], "  exportTo: ['.']\n")
        # google.com is exported everywhere by bar/ratings: conflict
        + vs(
            "ratings",
            "team2",
            ["ratings.team1.svc.cluster.local", "google.com"],
            "  exportTo: ['.']\n  gateways: [ingress, mesh]\n",
        )
        + vs("ratings", "team3", ["ratings"], "  exportTo: ['*']\n")
        + vs("ratings", "team4", ["ratings.team3.svc.cluster.local"], "  gateways: [gw, mesh]\n")
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0109"},
        ("IST0109", "VirtualService foo/productpage"),
        ("IST0109", "VirtualService foo/bogus-productpage"),
        ("IST0109", "VirtualService foo/ratings"),
        ("IST0109", "VirtualService bar/ratings"),
        ("IST0109", "VirtualService team2/ratings"),
        ("IST0109", "VirtualService team3/ratings"),
        ("IST0109", "VirtualService team4/ratings"),
    )
    first = next(p for p in problems if p.code == "IST0109")
    assert first.level == "Error" and first.field == "metadata.name"
    assert "define the same host */productpage.foo.svc.cluster.local" in first.message


def test_conflicting_mesh_gateway_hosts_with_export_to_and_wildcards() -> None:
    text = (
        # one wildcard host exported everywhere from two namespaces: conflict
        vs("productpage", "foo", ["*.productpage"])
        + vs("productpage", "bar", ["*.productpage"])
        # each exported to its own namespace: no conflict
        + vs("productpage-b", "foo", ["*.productpage.b"], "  exportTo: [foo]\n")
        + vs("productpage-b", "bar", ["*.productpage.b"], "  exportTo: ['.']\n")
        # one exported to foo, the other everywhere: conflict
        + vs("productpage-c", "foo", ["*.productpage.c"], "  exportTo: [foo]\n")
        + vs("productpage-c", "bar", ["*.productpage.c"], "  exportTo: ['*']\n")
        # overlapping wildcards: *.d (everywhere) covers *.productpage.d (in foo): conflict
        + vs("productpage-d", "foo", ["*.productpage.d"], "  exportTo: ['.']\n")
        + vs("productpage-d", "bar", ["*.d"], "  exportTo: ['*']\n")
    )
    expect(
        analyze(load(text)),
        {"IST0109"},
        ("IST0109", "VirtualService foo/productpage"),
        ("IST0109", "VirtualService bar/productpage"),
        ("IST0109", "VirtualService foo/productpage-c"),
        ("IST0109", "VirtualService bar/productpage-c"),
        ("IST0109", "VirtualService foo/productpage-d"),
        ("IST0109", "VirtualService bar/productpage-d"),
    )


# ----------------------------------------------------------------------------- IST0101 / 0112


SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{host}]
  addresses: [240.0.0.1]
  ports: {ports}
{extra}---
"""


def test_destination_hosts_and_ports() -> None:
    text = (
        SE.format(
            name="reviews",
            ns="default",
            host="reviews.default.svc.cluster.local",
            ports="[{number: 9080, name: http, protocol: HTTP}]",
            extra="",
        )
        + SE.format(
            name="two-ports",
            ns="default",
            host="reviews2.default.svc.cluster.local",
            ports="[{number: 80, name: http, protocol: HTTP}, "
            "{number: 443, name: https, protocol: HTTPS}]",
            extra="",
        )
        + SE.format(
            name="hidden",
            ns="hello",
            host="hello.internal",
            ports="[{number: 80, name: http, protocol: HTTP}]",
            extra="  exportTo: ['.']\n",
        )
        + vs("reviews-ok", "default", ["reviews"], dest="reviews")
        + vs("reviews-bogushost", "default", ["reviews"], dest="reviews-bogus")
        + vs("reviews-bogusport", "default", ["reviews"], dest="reviews, port: {number: 1}")
        + vs("reviews-2port-missing", "default", ["reviews2"], dest="reviews2")
        + vs("reviews-2port-ok", "default", ["reviews2"], dest="reviews2, port: {number: 80}")
        + vs("hello-same-ns", "hello", ["hello.internal"], dest="hello.internal")
        + vs("hello-other-ns", "default", ["hello.internal"], dest="hello.internal")
        + (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: reviews-mirror-bogushost, namespace: default}\nspec:\n"
            "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
            "    mirror: {host: mirror-bogus}\n---\n"
        )
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0101", "IST0112"},
        ("IST0101", "VirtualService default/reviews-bogushost"),
        ("IST0101", "VirtualService default/reviews-bogusport"),
        ("IST0112", "VirtualService default/reviews-2port-missing"),
        ("IST0101", "VirtualService default/hello-other-ns"),
        ("IST0101", "VirtualService default/reviews-mirror-bogushost"),
    )
    msgs = {p.message for p in problems if p.code in ("IST0101", "IST0112")}
    assert 'Referenced host:port not found: "reviews:1"' in msgs
    assert 'Referenced mirror host not found: "mirror-bogus"' in msgs
    assert (
        'This VirtualService routes to a service "reviews2" that exposes multiple ports '
        "[80 443]. Specifying a port in the destination is required to disambiguate." in msgs
    )


def test_kubernetes_services_are_hosts_with_ports() -> None:
    resources = load(
        vs("ok", "default", ["details"], dest="details")
        + vs("port", "default", ["details"], dest="details, port: {number: 9080}")
        + vs("badport", "default", ["details"], dest="details, port: {number: 80}")
        + vs("missing", "default", ["details"], dest="detials")
    )
    resources.append(kube_service("details", "default", [("http", 9080)]))
    problems = analyze(resources)
    expect(
        problems,
        {"IST0101", "IST0112"},
        ("IST0101", "VirtualService default/badport"),
        ("IST0101", "VirtualService default/missing"),
    )
    (miss,) = [p for p in problems if p.resource == "missing" and p.code == "IST0101"]
    assert miss.hint == "did you mean 'details'?"


def test_subsets_in_destination_rules() -> None:
    dr = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n"
        "  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\n"
    )
    text = (
        dr
        + vs("reviews", "default", ["reviews"], dest="reviews, subset: v1")
        + vs("reviews-bogussubset", "default", ["reviews"], dest="reviews, subset: v3")
        + (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: reviews-mirror-bogussubset, namespace: default}\nspec:\n"
            "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
            "    mirror: {host: reviews, subset: v4}\n---\n"
        )
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0101"},
        ("IST0101", "VirtualService default/reviews-bogussubset"),
        ("IST0101", "VirtualService default/reviews-mirror-bogussubset"),
    )
    assert {p.message for p in problems if p.code == "IST0101"} == {
        'Referenced host+subset in destinationrule not found: "reviews+v3"',
        'Referenced mirror+subset in destinationrule not found: "reviews+v4"',
    }


# ----------------------------------------------------------------------------- IST0101 / 0132


GW = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: {hosts}
---
"""


def test_gateways_referenced_and_their_hosts() -> None:
    text = (
        GW.format(name="httpbin-gateway", ns="default", hosts="['*.example.com']")
        + GW.format(name="crossnamespace-gw", ns="another", hosts="['default/*.example.com']")
        + GW.format(name="other-ns-only", ns="another", hosts="['prod/*.example.com']")
        + vs("httpbin", "default", ["httpbin.example.com"], "  gateways: [httpbin-gateway]\n")
        + vs("httpbin-bogus", "default", ["httpbin.example.com"], "  gateways: [httpbin-gw]\n")
        + vs("wrong-host", "default", ["httpbin.other.org"], "  gateways: [httpbin-gateway]\n")
        + vs(
            "cross-test",
            "default",
            ["httpbin.example.com"],
            "  gateways: [another/crossnamespace-gw]\n",
        )
        + vs(
            "not-for-us",
            "default",
            ["httpbin.example.com"],
            "  gateways: [another/other-ns-only]\n",
        )
        + vs("httpbin-mesh", "default", ["httpbin"], "  gateways: [mesh]\n")
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0101", "IST0132"},
        ("IST0101", "VirtualService default/httpbin-bogus"),
        ("IST0132", "VirtualService default/httpbin-bogus"),
        ("IST0132", "VirtualService default/wrong-host"),
        ("IST0132", "VirtualService default/not-for-us"),
    )
    bogus = next(p for p in problems if p.code == "IST0101")
    assert bogus.message == 'Referenced gateway not found: "httpbin-gw"'
    assert bogus.hint == "did you mean 'default/httpbin-gateway'?"


# ----------------------------------------------------------------------------- IST0128 / 0129

DR_TLS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: mydbserver.prod.svc.cluster.local
  trafficPolicy:
{policy}---
"""


def test_destination_rule_tls_without_ca_certificates() -> None:
    text = (
        DR_TLS.format(name="db-tls", policy="    tls: {mode: SIMPLE}\n")
        + DR_TLS.format(
            name="db-mtls",
            policy="    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}\n",
        )
        + DR_TLS.format(
            name="db-port",
            policy="    portLevelSettings:\n    - port: {number: 443}\n      tls: {mode: SIMPLE}\n",
        )
        + DR_TLS.format(
            name="db-both",
            policy="    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}\n"
            "    portLevelSettings:\n    - port: {number: 443}\n      tls: {mode: SIMPLE}\n",
        )
        + DR_TLS.format(
            name="db-with-ca",
            policy="    tls: {mode: SIMPLE, caCertificates: /ca.pem}\n"
            "    portLevelSettings:\n    - port: {number: 443}\n"
            "      tls: {mode: SIMPLE, caCertificates: /ca.pem}\n",
        )
        + DR_TLS.format(
            name="db-credential", policy="    tls: {mode: SIMPLE, credentialName: db}\n"
        )
        + DR_TLS.format(name="db-istio", policy="    tls: {mode: ISTIO_MUTUAL}\n")
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0128", "IST0129"},
        ("IST0128", "DestinationRule default/db-tls"),
        ("IST0128", "DestinationRule default/db-mtls"),
        ("IST0129", "DestinationRule default/db-port"),
        ("IST0128", "DestinationRule default/db-both"),
        ("IST0129", "DestinationRule default/db-both"),
    )
    port = next(p for p in problems if p.code == "IST0129" and p.resource == "db-port")
    assert port.level == "Warning" and port.field == "spec.trafficPolicy.portLevelSettings[0].tls"
    assert port.message == (
        "DestinationRule default/db-port in namespace default has TLS mode set to SIMPLE but no "
        "caCertificates are set to validate server identity for host: "
        "mydbserver.prod.svc.cluster.local at port number:443"
    )


def test_unknown_destination_rule_host() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\n"
        "spec: {host: reviews}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b}\n"
        "spec: {host: reviewz}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: c}\n"
        "spec: {host: '*.example.com'}\n"
    )
    resources = load(text)
    assert analyze(resources) == []  # nothing says which hosts exist: not checked
    expect(
        analyze(resources, registry_for_hosts(["reviews"])),
        {"IST0174"},
        ("IST0174", "DestinationRule default/b"),
    )


# ----------------------------------------------------------------------------- IST0145 / 0138


def test_conflicting_gateways() -> None:
    text = (
        GW.format(name="beta", ns="default", hosts="[foo.bar]")
        + GW.format(name="alpha", ns="default", hosts="[foo.bar]")
        + GW.format(name="wild", ns="default", hosts="['*.example.com']").replace(
            "istio: ingressgateway", "istio: other"
        )
        + GW.format(name="wild-2", ns="default", hosts="[www.example.com]").replace(
            "istio: ingressgateway", "istio: other"
        )
        + GW.format(name="other-port", ns="default", hosts="[foo.bar]").replace(
            "number: 80", "number: 8080"
        )
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0145"},
        ("IST0145", "Gateway default/beta"),
        ("IST0145", "Gateway default/alpha"),
        ("IST0145", "Gateway default/wild"),
        ("IST0145", "Gateway default/wild-2"),
    )
    beta = next(p for p in problems if p.code == "IST0145")
    assert beta.message == (
        "Conflict with gateways default/alpha (workload selector istio=ingressgateway, port 80, "
        "hosts foo.bar)."
    )


def test_gateway_duplicate_certificate_and_empty_gateway() -> None:
    def tls_gw(name: str, ns: str, cred: str, selector: str = "istio: ingressgateway") -> str:
        return (
            f"apiVersion: networking.istio.io/v1\nkind: Gateway\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{{selector}}}\n"
            "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n"
            f"    tls: {{mode: SIMPLE, credentialName: {cred}}}\n    hosts: [{name}.example.com]\n"
            "---\n"
        )

    text = (
        tls_gw("gw-01-test-01", "istio-system", "cert-01")
        + tls_gw("gw-02-test-01", "istio-system", "cert-01")
        # the narrower selector's gateway is a subset target only the other way round
        + tls_gw("gw-01-test-02", "istio-system", "cert-02")
        + tls_gw("gw-02-test-02", "istio-system", "cert-02", "istio: ingressgateway, type: x")
        + tls_gw("gw-01-test-03", "istio-system", "cert-03a")
        + tls_gw("gw-02-test-03", "istio-system", "cert-03b")
        + "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: empty}\n"
        "spec: {selector: {istio: ingressgateway}}\n"
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0138", "IST0106"},
        ("IST0138", "Gateway istio-system/gw-01-test-01"),
        ("IST0138", "Gateway istio-system/gw-02-test-01"),
        ("IST0138", "Gateway istio-system/gw-01-test-02"),
        ("IST0106", "Gateway default/empty"),
    )


# ----------------------------------------------------------------------------- IST0134 / 0177


def test_service_entry_addresses_required() -> None:
    def se(name: str, ports: str, addresses: str = "") -> str:
        return (
            f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\n"
            f"spec:\n  hosts: [{name}.example.com]\n{addresses}  ports: {ports}\n---\n"
        )

    text = (
        se("se-01", "[{number: 80, name: http, protocol: HTTP}]")
        + se("se-02", "[{number: 5432, name: tcp, protocol: TCP}]", "  addresses: [240.0.0.2]\n")
        + se("se-03", "[{number: 5432, name: tcp, protocol: TCP}]")
        + se("se-04", "[{number: 5432, name: db}]")
        + se("se-05", "[{number: 5432, name: db, protocol: tcp}, {number: 5433, name: db2}]")
        # no ports at all: valid, and nothing to require an address for
        + "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se-06}\n"
        "spec:\n  hosts: [se-06.example.com]\n  resolution: DNS\n"
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0134"},
        ("IST0134", "ServiceEntry default/se-03"),
        ("IST0134", "ServiceEntry default/se-04"),
        ("IST0134", "ServiceEntry default/se-05"),
        ("IST0134", "ServiceEntry default/se-05"),
    )
    assert all(p.level == "Warning" for p in problems)
    assert not [p for p in problems if p.resource == "se-06"]


def test_conflicting_service_entry_protocols() -> None:
    def se(name: str, proto: str, ns: str = "default", extra: str = "") -> str:
        return (
            f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [api.example.com]\n"
            f"  ports: [{{number: 443, name: p, protocol: {proto}}}]\n  resolution: DNS\n{extra}"
            "---\n"
        )

    text = (
        se("api-http", "HTTP")
        + se("api-tls", "TLS")
        + se("private-a", "HTTPS", "a", "  exportTo: ['.']\n")
        + se("private-b", "HTTP2", "b", "  exportTo: ['.']\n")
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0177"},
        ("IST0177", "ServiceEntry default/api-http"),
        ("IST0177", "ServiceEntry default/api-tls"),
        ("IST0177", "ServiceEntry a/private-a"),
        ("IST0177", "ServiceEntry b/private-b"),
    )
    msg = next(p.message for p in problems if p.resource == "api-http")
    assert msg.startswith(
        "Multiple ServiceEntries (a/private-a, b/private-b, default/api-http, default/api-tls) "
        'define the same host "api.example.com" and port 443 with conflicting protocols '
        "(HTTP, HTTP2, HTTPS, TLS)."
    )
    # private-a and private-b never meet: each conflicts only through the exported pair
    msg_a = next(p.message for p in problems if p.resource == "private-a")
    assert "(a/private-a, default/api-http, default/api-tls)" in msg_a


# ----------------------------------------------------------------------------- IST0110 / 0111


def sidecar(name: str, ns: str, selector: str = "") -> str:
    ws = f"  workloadSelector: {{labels: {{{selector}}}}}\n" if selector else ""
    return (
        f"apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{ws}"
        "  egress: [{hosts: ['./*']}]\n---\n"
    )


def test_sidecars_without_selectors() -> None:
    text = (
        sidecar("no-conflict", "ns1")
        + sidecar("has-conflict-1", "ns2")
        + sidecar("has-conflict-2", "ns2")
        + sidecar("selected", "ns2", "app: a")
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0111"},
        ("IST0111", "Sidecar ns2/has-conflict-1"),
        ("IST0111", "Sidecar ns2/has-conflict-2"),
    )
    assert next(p for p in problems if p.code == "IST0111").message == (
        "The Sidecars [ns2/has-conflict-1 ns2/has-conflict-2] in namespace 'ns2' have no "
        "workload selector, which can lead to undefined behavior."
    )


def pod(name: str, ns: str, **labels: str) -> WorkloadInstance:
    return WorkloadInstance(name, name, "127.0.0.1", {}, (), ns, dict(labels))


def test_sidecar_selectors_against_workloads() -> None:
    text = (
        sidecar("maps-correctly-no-conflicts", "default", "app: productpage")
        + sidecar("maps-to-nonexistent", "default", "app: bogus")
        + sidecar("maps-to-different-ns", "other", "app: reviews")
        + sidecar("dupe-1", "default", "app: reviews")
        + sidecar("dupe-2", "default", "app: reviews")
        + sidecar("overlap-1", "default", "app: ratings-app")
        + sidecar("overlap-2", "default", "myapp: ratings-myapp")
    )
    registry = Registry(
        services=(Service("x.default.svc.cluster.local", ports=(ServicePort(80),)),),
        instances=(
            pod("productpage", "default", app="productpage"),
            pod("productpage-other", "other", app="productpage"),
            pod("reviews", "default", app="reviews"),
            pod("ratings", "default", app="ratings-app", myapp="ratings-myapp"),
        ),
    )
    expect(
        analyze(load(text), registry),
        {"IST0101", "IST0110"},
        ("IST0101", "Sidecar default/maps-to-nonexistent"),
        ("IST0101", "Sidecar other/maps-to-different-ns"),
        ("IST0110", "Sidecar default/dupe-1"),
        ("IST0110", "Sidecar default/dupe-2"),
        ("IST0110", "Sidecar default/overlap-1"),
        ("IST0110", "Sidecar default/overlap-2"),
    )
    # without workloads, only selectors that are identical are certain to conflict
    expect(
        analyze(load(text)),
        {"IST0101", "IST0110"},
        ("IST0110", "Sidecar default/dupe-1"),
        ("IST0110", "Sidecar default/dupe-2"),
    )


# ----------------------------------------------------------------------------- IST0002 / 0118


def test_deprecated_fields() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: productpage, namespace: foo}\nspec:\n  hosts: [productpage]\n"
        "  http:\n  - fault:\n      delay: {fixedDelay: 5s, percent: 50}\n"
        "    route:\n    - destination: {host: productpage}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        "metadata: {name: no-selector, namespace: default}\nspec:\n"
        "  egress: [{hosts: ['./*']}]\n"
        "  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n    egressProxy: {host: egress}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: od, namespace: default}\nspec:\n  host: reviews\n"
        "  trafficPolicy: {outlierDetection: {consecutiveErrors: 5}}\n"
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0002"},
        ("IST0002", "VirtualService foo/productpage"),
        ("IST0002", "Sidecar default/no-selector"),
        ("IST0002", "DestinationRule default/od"),
    )
    vs_msg = next(p for p in problems if p.code == "IST0002" and p.kind == "VirtualService")
    assert vs_msg.message == (
        "Deprecated: HTTPRoute.fault.delay.percent is deprecated; use "
        "HTTPRoute.fault.delay.percentage"
    )
    assert vs_msg.field == "spec.http[0].fault.delay.percent" and vs_msg.line == 8


def test_service_port_names() -> None:
    services = [
        kube_service("my-service1", "my-namespace1", [("foo", 8080), ("bar", 8081)]),
        kube_service("my-service2", "my-namespace2", [(None, 8080)]),
        kube_service("good", "default", [("http-web", 80), ("grpc", 81)]),
        kube_service("system", "istio-system", [("metrics", 15014)]),
    ]
    problems = analyze(services)
    expect(
        problems,
        {"IST0118"},
        ("IST0118", "Service my-namespace1/my-service1"),
        ("IST0118", "Service my-namespace1/my-service1"),
        ("IST0118", "Service my-namespace2/my-service2"),
    )
    assert all(p.level == "Info" for p in problems if p.code == "IST0118")
    assert (
        "Port name foo (port: 8080, targetPort: 8080) doesn't follow the naming convention of "
        "Istio port." in {p.message for p in problems}
    )


# ----------------------------------------------------------------------------- valid config


@pytest.mark.parametrize(
    "text",
    [
        # a delegate VirtualService has no hosts
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: reviews-delegate}\nspec:\n"
            "  http:\n  - route:\n    - destination: {host: reviews}\n"
        ),
        # a ServiceEntry without ports
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\n"
            "spec:\n  hosts: [ext.example.com]\n  resolution: DNS\n"
        ),
    ],
    ids=["delegate-without-hosts", "service-entry-without-ports"],
)
def test_valid_istio_config_has_no_findings(text: str) -> None:
    assert analyze(load(text)) == []


# ----------------------------------------------------------------------------- IST0140 / 0150


def test_ingress_route_rules_not_affected_by_subsets() -> None:
    text = (
        vs(
            "gateway-route",
            "default",
            ["shop.example.com"],
            "  gateways: [shop-gateway]\n",
            dest="reviews",
        )
        + vs("mesh-split", "default", ["reviews"], dest="reviews, subset: v1")
        + vs(
            "gateway-subset",
            "default",
            ["a.example.com"],
            "  gateways: [x]\n",
            dest="reviews, subset: v2",
        )
        + vs("other-host", "default", ["shop2.example.com"], "  gateways: [x]\n", dest="ratings")
        + vs("mesh-only", "default", ["shop3.example.com"], "  gateways: [mesh]\n", dest="reviews")
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0140"},
        ("IST0140", "VirtualService default/gateway-route"),
    )
    assert next(p for p in problems if p.code == "IST0140").message == (
        "Subset in virtual service default/mesh-split has no effect on ingress gateway "
        "default/gateway-route requests"
    )


def external_service(name: str, ns: str, port_name: str | None) -> Resource:
    svc = kube_service(name, ns, [(port_name, 443)])
    spec = SimpleNamespace(
        type="ExternalName", external_name="nginx.example.com", selector=None, ports=svc.spec.ports
    )
    return Resource("Service", "v1", name, ns, spec, "svc.yaml", 1, 1)  # type: ignore[arg-type]


def test_external_name_service_port_names() -> None:
    problems = analyze(
        [
            external_service("nginx", "nginx-ns", "nginx"),
            external_service("nginx-svc2", "nginx-ns2", None),
            external_service("nginx-svc3", "nginx-ns3", "tcp"),
            external_service("nginx-ok", "nginx-ns4", "https"),
        ]
    )
    expect(
        problems,
        {"IST0150", "IST0118"},
        ("IST0150", "Service nginx-ns/nginx"),
        ("IST0150", "Service nginx-ns2/nginx-svc2"),
        ("IST0150", "Service nginx-ns3/nginx-svc3"),
    )


# ----------------------------------------------------------------------------- IST0159 / 0160


def telemetry(name: str, ns: str, selector: dict[str, str] | None = None) -> Resource:
    """A Telemetry: loaded from YAML when the loader reads Telemetry, else built."""
    sel = f"  selector: {{matchLabels: {selector!r}}}\n" if selector else ""
    text = (
        f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}"
        "  tracing: [{randomSamplingPercentage: 10}]\n"
    )
    loaded = [r for r in load_text(text, "tel.yaml").resources if r.kind == "Telemetry"]
    if loaded:
        return loaded[0]
    spec = SimpleNamespace(
        selector=SimpleNamespace(match_labels=selector) if selector else None,
        target_ref=None,
        target_refs=[],
    )
    return Resource("Telemetry", "telemetry.istio.io/v1", name, ns, spec, "tel.yaml", 1, 1)  # type: ignore[arg-type]


def test_telemetry_selectors() -> None:
    resources = [
        telemetry("mesh-default", "istio-system"),
        telemetry("ns-1", "shop"),
        telemetry("ns-2", "shop"),
        telemetry("reviews-a", "shop", {"app": "reviews"}),
        telemetry("reviews-b", "shop", {"app": "reviews"}),
        telemetry("ratings", "shop", {"app": "ratings"}),
        telemetry("ratings-v1", "shop", {"version": "v1"}),
    ]
    expect(
        analyze(resources),
        {"IST0159", "IST0160"},
        ("IST0160", "Telemetry shop/ns-1"),
        ("IST0160", "Telemetry shop/ns-2"),
        ("IST0159", "Telemetry shop/reviews-a"),
        ("IST0159", "Telemetry shop/reviews-b"),
    )
    # with the workloads known, overlapping selectors conflict on the pod both pick
    registry = Registry(
        instances=(pod("ratings-v1-1", "shop", app="ratings", version="v1"),),
    )
    expect(
        analyze(resources, registry),
        {"IST0159"},
        ("IST0159", "Telemetry shop/reviews-a"),
        ("IST0159", "Telemetry shop/reviews-b"),
        ("IST0159", "Telemetry shop/ratings"),
        ("IST0159", "Telemetry shop/ratings-v1"),
    )


# ----------------------------------------------------------------------------- IST0130 / 0131


def test_unreachable_rules_and_ineffective_matches() -> None:
    def rules(name: str, body: str) -> str:
        return (
            f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\n"
            f"spec:\n  hosts: [{name}]\n{body}---\n"
        )

    route = "    route:\n    - destination: {host: reviews}\n"
    tcp_route = "    route:\n    - destination: {host: db, port: {number: 5432}}\n"
    text = (
        # a match repeated in a later rule: the match is ineffective, the rule unreachable
        rules(
            "duplicate-match",
            "  http:\n  - match: [{uri: {exact: /a}}]\n"
            + route
            + "  - match: [{uri: {exact: /a}}]\n"
            + route,
        )
        # one of two matches repeated: only the match is ineffective
        + rules(
            "almost-duplicate-match",
            "  http:\n  - match: [{uri: {exact: /a}}]\n"
            + route
            + "  - match: [{uri: {exact: /a}}, {uri: {exact: /b}}]\n"
            + route,
        )
        # a repeat inside one rule counts too
        + rules(
            "overlapping-in-single-match",
            "  http:\n  - match: [{method: {exact: GET}}, {method: {exact: GET}}]\n" + route,
        )
        # names do not make matches different
        + rules(
            "named",
            "  http:\n  - name: first\n    match: [{name: a, uri: {exact: /a}}]\n"
            + route
            + "  - name: second\n    match: [{name: b, uri: {exact: /a}}]\n"
            + route,
        )
        # tcp: two rules without match
        + rules(
            "duplicate-empty-tcp",
            "  tcp:\n  - match: []\n" + tcp_route + "  - route:\n    - destination: {host: db}\n",
        )
        + rules(
            "duplicate-tcp-match",
            "  tcp:\n  - match: [{port: 5432}]\n"
            + tcp_route
            + "  - match: [{port: 5432}]\n"
            + tcp_route,
        )
    )
    problems = analyze(load(text))
    expect(
        problems,
        {"IST0130", "IST0131"},
        ("IST0130", "VirtualService default/duplicate-match"),
        ("IST0131", "VirtualService default/duplicate-match"),
        ("IST0131", "VirtualService default/almost-duplicate-match"),
        ("IST0131", "VirtualService default/overlapping-in-single-match"),
        ("IST0130", "VirtualService default/named"),
        ("IST0131", "VirtualService default/named"),
        ("IST0130", "VirtualService default/duplicate-empty-tcp"),
        ("IST0130", "VirtualService default/duplicate-tcp-match"),
        ("IST0131", "VirtualService default/duplicate-tcp-match"),
    )
    named = {p.message for p in problems if p.resource == "named"}
    assert named == {
        'VirtualService rule "second" not used (all matches used by prior rules).',
        (
            'VirtualService rule "second" match "b" is not used (duplicate/overlapping match in '
            'rule "first").'
        ),
    }
    empty_tcp = next(p for p in problems if p.resource == "duplicate-empty-tcp")
    assert empty_tcp.message == (
        "VirtualService rule #1 not used (only the last rule can have no matches)."
    )
    assert empty_tcp.field == "spec.tcp[1]"

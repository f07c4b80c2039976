"""Istio's Bookinfo tasks with the Kubernetes Gateway API, on a local mesh through real sidecars.

The YAML is Istio's own (``samples/bookinfo/gateway-api``): the ``bookinfo-gateway`` Gateway
(listener port 80) and HTTPRoute for ingress, and HTTPRoutes whose parent is the ``reviews``
Service (GAMMA) for traffic shifting between the version Services of ``bookinfo-versions.yaml``
(``reviews-v1`` ... selecting ``app: reviews, version: v1`` ...). The assertions are what Istio's
docs promise the user sees, with binomial tolerances for the shifted shares.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread

ROOT = Path(__file__).resolve().parents[2]
GW_API = ROOT / ".." / "shared" / "istio" / "samples" / "bookinfo" / "gateway-api"
MESH = ROOT / "samples" / "bookinfo" / "mesh-gateway-api.yaml"
SERVED_BY = re.compile(r"Reviews served by:\s*(?:<[^>]*>)?\s*([a-z0-9-]+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not GW_API.is_dir(), reason=f"Istio's samples not found at {GW_API}"),
]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def served_by(body: str) -> str:
    m = SERVED_BY.search(body)
    assert m, body[-600:]
    return m.group(1)


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    # samples/bookinfo/mesh-gateway-api.yaml: Bookinfo plus the version Services of Istio's
    # bookinfo-versions.yaml, the ingress gateway serving listener port 80 (here a free port)
    with MeshThread(MESH, gateway_host_port=0) as m:
        m.apply_file(GW_API / "bookinfo-gateway.yaml")
        m.wait_synced()
        yield m


def page(mesh: MeshThread) -> tuple[int, str]:
    return get(mesh.gateway_url + "/productpage")


def shares(mesh: MeshThread, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = page(mesh)
        assert status == 200
        seen[served_by(body)] += 1
    return seen


def test_ingress_gateway_serves_only_the_routed_paths(mesh: MeshThread) -> None:
    """Istio's "Determining the ingress IP and ports" step: /productpage answers via the Gateway."""
    status, body = page(mesh)
    assert status == 200 and "Book Details" in body, body[:300]
    status, _ = get(mesh.gateway_url + "/api/v1/products")
    assert status == 200
    # paths no HTTPRoute rule matches: 404 from the gateway (PathPrefix /static is not /staticx)
    for path in ("/", "/staticx", "/productpage/extra"):
        assert get(mesh.gateway_url + path)[0] == 404, path


def test_traffic_shifting_with_gateway_api(mesh: MeshThread) -> None:
    """Istio's traffic shifting task, Gateway API tab: all v1 -> 50 % v3 -> 100 % v3; and
    the 90/10 split of the canary sample."""
    mesh.apply_file(GW_API / "route-reviews-v1.yaml")
    mesh.wait_synced()
    assert set(shares(mesh, 10)) == {"reviews-v1-1"}

    mesh.apply_file(GW_API / "route-reviews-50-v3.yaml")
    mesh.wait_synced()
    seen = shares(mesh, 100)
    assert set(seen) == {"reviews-v1-1", "reviews-v3-1"}, seen
    # binomial(100, 0.5): sd 5; 30..70 is +-4 sd
    assert 30 <= seen["reviews-v3-1"] <= 70, seen

    mesh.apply_file(GW_API / "route-reviews-90-10.yaml")
    mesh.wait_synced()
    seen = shares(mesh, 200)
    assert set(seen) <= {"reviews-v1-1", "reviews-v2-1"}, seen
    # binomial(200, 0.1): mean 20, sd 4.2; 5..40 is -3.5 sd .. +4.7 sd
    assert 5 <= seen["reviews-v2-1"] <= 40, seen

    mesh.apply_file(GW_API / "route-reviews-v3.yaml")
    mesh.wait_synced()
    assert set(shares(mesh, 20)) == {"reviews-v3-1"}


def test_route_all_v1(mesh: MeshThread) -> None:
    """route-all-v1.yaml sends every service to its v1 Service: reviews always v1."""
    mesh.apply_file(GW_API / "route-all-v1.yaml")
    mesh.wait_synced()
    try:
        assert set(shares(mesh, 20)) == {"reviews-v1-1"}
    finally:
        mesh.delete_text((GW_API / "route-all-v1.yaml").read_text())
        mesh.wait_synced()


FILTERS = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: filters}
spec:
  parentRefs: [{name: bookinfo-gateway}]
  hostnames: [filters.example.com]
  rules:
  - matches: [{path: {type: Exact, value: /productpage}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Route, value: filters}]}
    backendRefs: [{name: productpage, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: new.example.com, path: {type: ReplaceFullPath, replaceFullPath: /productpage}}
  - matches: [{path: {type: PathPrefix, value: /v1/books}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /api/v1/products}}
  - matches: [{path: {type: Exact, value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https}
  - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
    backendRefs: [{name: ratings, namespace: prod, port: 9080}]
  - matches: [{path: {type: Exact, value: /api/v1/products}}]
    backendRefs:
    - {name: productpage, port: 9080}
    - {name: nosuch, port: 9080}
"""


def raw(mesh: MeshThread, path: str, host: str) -> tuple[int, dict[str, str]]:
    import http.client

    port = int(mesh.gateway_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_filters_redirect_and_refused_backend_through_the_gateway(mesh: MeshThread) -> None:
    mesh.apply_text(FILTERS, "filters.yaml")
    mesh.wait_synced()
    try:
        status, headers = raw(mesh, "/productpage", "filters.example.com")
        assert status == 200 and headers.get("x-route") == "filters"
        # the catch-all bookinfo route does not add the header
        assert "x-route" not in raw(mesh, "/productpage", "other.example.com")[1]
        status, headers = raw(mesh, "/old/x?y=1", "filters.example.com")
        assert status == 302  # the Gateway API's default redirect code
        assert headers["location"] == "http://new.example.com/productpage?y=1"
        # ReplacePrefixMatch: the matched prefix is replaced, the rest of the path kept
        status, headers = raw(mesh, "/v1/books/0/reviews?x=1", "filters.example.com")
        assert status == 301
        assert headers["location"] == "http://filters.example.com/api/v1/products/0/reviews?x=1"
        status, headers = raw(mesh, "/v1/books", "filters.example.com")
        assert headers["location"] == "http://filters.example.com/api/v1/products"
        # a scheme change without a port goes to the scheme's well-known port (not written)
        status, headers = raw(mesh, "/secure", "filters.example.com:8080")
        assert (status, headers["location"]) == (302, "https://filters.example.com/secure")
        # a cross-namespace backend without a ReferenceGrant: 500, never forwarded
        assert raw(mesh, "/elsewhere", "filters.example.com")[0] == 500
        # one valid and one missing backend, equal weights: about half fail (503), the
        # snapshot stays valid (the gateway ACKed it: wait_synced above)
        codes = Counter(raw(mesh, "/api/v1/products", "filters.example.com")[0] for _ in range(40))
        assert set(codes) == {200, 503}, codes
    finally:
        mesh.delete_text(FILTERS)
        mesh.wait_synced()

"""Istio's security tasks on a local Bookinfo mesh with real sidecars and the control plane's CA.

- HTTP authorization (Istio task "Authorization on HTTP traffic"): ``allow-nothing`` makes the
  product page 403 ``RBAC: access denied``; then productpage GET from anywhere, details and
  reviews only from productpage's principal, ratings only from reviews' -> the page works again.
- mTLS migration: a client without a sidecar (plain HTTP to a sidecar's inbound port) works
  under PERMISSIVE and is refused under STRICT, while sidecar-to-sidecar traffic keeps working.
- Telemetry: ``connection_security_policy="mutual_tls"`` and the caller's SPIFFE principal.
- ``openssl s_client`` sees the workload certificate (SPIFFE URI SAN); STRICT refuses it
  without a client certificate.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.testing.controlplane import admin_get

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"
OPENSSL = shutil.which("openssl")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(BOOKINFO / "mesh.yaml", gateway_host_port=0) as m:
        m.apply_file(NET / "bookinfo-gateway.yaml")
        m.apply_file(NET / "destination-rule-all.yaml")
        m.wait_synced()
        yield m


def page(mesh: MeshThread) -> tuple[int, str]:
    return get(mesh.gateway_url + "/productpage")


def workload(mesh: MeshThread, name: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["name"] == name)


def inbound_port(mesh: MeshThread, name: str) -> int:
    return int(workload(mesh, name)["inbound_ports"]["9080"])


# --------------------------------------------------------------------------- authorization

ALLOW_NOTHING = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: default
spec:
  {}
"""

PRODUCTPAGE_VIEWER = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "productpage-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
"""

DETAILS_REVIEWS_RATINGS_VIEWERS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "details-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "reviews-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: "ratings-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
    to:
    - operation:
        methods: ["GET"]
"""


def test_http_authorization_task(mesh: MeshThread) -> None:
    status, body = page(mesh)
    assert status == 200, body[:300]
    try:
        mesh.apply_text(ALLOW_NOTHING)
        mesh.wait_synced()
        status, body = page(mesh)
        assert (status, body) == (403, "RBAC: access denied")

        mesh.apply_text(PRODUCTPAGE_VIEWER)
        mesh.wait_synced()
        status, body = page(mesh)
        assert status == 200, body[:300]
        assert "Error fetching product details" in body
        assert "Error fetching product reviews" in body

        mesh.apply_text(DETAILS_REVIEWS_RATINGS_VIEWERS)
        mesh.wait_synced()
        for _ in range(6):  # round robin over reviews v1, v2, v3
            status, body = page(mesh)
            assert status == 200, body[:300]
            assert "Error fetching" not in body, body[:2000]
            assert "ratings are currently unavailable" not in body, body[:2000]

        # details only from productpage's identity: a client without one is denied
        status, body = get(f"http://127.0.0.1:{inbound_port(mesh, 'details-v1-1')}/details/0")
        assert (status, body) == (403, "RBAC: access denied")
        # ... and the refusal is counted on details' sidecar (Envoy's rbac denied counter)
        admin = workload(mesh, "details-v1-1")["admin_port"]
        _, stats = get(f"http://127.0.0.1:{admin}/stats?filter=rbac_denied")
        m = re.search(r"^http\.rbac_denied: (\d+)$", stats, re.MULTILINE)
        assert m and int(m.group(1)) >= 1, stats
    finally:
        mesh.delete_text(ALLOW_NOTHING + "---" + PRODUCTPAGE_VIEWER + "---"
                         + DETAILS_REVIEWS_RATINGS_VIEWERS)  # fmt: skip
        mesh.wait_synced()
    status, body = page(mesh)
    assert status == 200


# --------------------------------------------------------------------------- mTLS migration

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
"""


def plain_request(port: int) -> tuple[int, str]:
    return get(f"http://127.0.0.1:{port}/details/0", timeout=5)


def s_client(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts", "-ign_eof", *extra],
        input="GET /details/0 HTTP/1.1\r\nhost: details\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def test_mtls_migration_permissive_then_strict(mesh: MeshThread, tmp_path: Path) -> None:
    details = inbound_port(mesh, "details-v1-1")
    # PERMISSIVE (Istio's default): the sidecar-less client gets through
    status, body = plain_request(details)
    assert status == 200 and '"id": 0' in body.replace('"id":0', '"id": 0'), body
    policy = tmp_path / "peer-authentication-strict.yaml"
    policy.write_text(STRICT)
    try:
        mesh.apply_file(policy)
        mesh.wait_synced()
        # STRICT: the plaintext connection is closed without an answer
        with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
            _opener.open(f"http://127.0.0.1:{details}/details/0", timeout=5).read()
        with socket.create_connection(("127.0.0.1", details), 5) as s:
            s.sendall(b"GET /details/0 HTTP/1.1\r\nhost: details\r\n\r\n")
            s.settimeout(5)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        # sidecar to sidecar (mTLS) is unaffected: the page is complete
        status, body = page(mesh)
        assert status == 200 and "Error fetching" not in body, body[:2000]
        if OPENSSL is not None:
            # no client certificate: the server ends the connection after the handshake
            # (TLS 1.3 checks the client certificate after the server's Finished), no answer
            r = s_client(details)
            assert "spiffe://cluster.local/ns/default/sa/bookinfo-details" in certificate_text(r)
            assert "HTTP/1.1" not in r.stdout
            out = r.stdout + r.stderr
            # refused: an alert, or the connection closed (EOF) or reset (errno 104), by timing
            refused = r"alert (number 116|certificate required)|unexpected eof|read:errno=104"
            assert re.search(refused, out), out[
                -2000:
            ]
    finally:
        mesh.delete_text(STRICT)
        mesh.wait_synced()
    status, _ = plain_request(details)
    assert status == 200


def certificate_text(r: subprocess.CompletedProcess[str]) -> str:
    """The server's leaf certificate from ``s_client -showcerts``, decoded by ``openssl x509``."""
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", r.stdout, re.DOTALL)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    assert OPENSSL is not None
    out = subprocess.run(
        [OPENSSL, "x509", "-noout", "-text"], input=m.group(0), capture_output=True, text=True,
        timeout=10, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_sees_the_workload_certificate(mesh: MeshThread) -> None:
    r = s_client(inbound_port(mesh, "ratings-v1-1"))
    text = certificate_text(r)
    assert "URI:spiffe://cluster.local/ns/default/sa/bookinfo-ratings" in text
    assert "ecdsa-with-SHA256" in text
    assert "TLSv1.3" in r.stdout


# --------------------------------------------------------------------------- telemetry


def requests_total(text: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith("istio_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            d = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            d["_value"] = value
            out.append(d)
    return out


def test_metrics_show_mutual_tls_and_principals(mesh: MeshThread) -> None:
    for _ in range(3):
        assert page(mesh)[0] == 200
    admin = workload(mesh, "details-v1-1")["admin_port"]
    status, text = get(f"http://127.0.0.1:{admin}/stats/prometheus")
    assert status == 200
    rows = [r for r in requests_total(text) if r["reporter"] == "destination"]
    mtls = [r for r in rows if r["connection_security_policy"] == "mutual_tls"]
    assert mtls, rows
    r = mtls[0]
    assert r["source_principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert r["destination_principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-details"
    assert r["source_workload"] == "productpage-v1"
    assert r["source_app"] == "productpage"
    assert float(r["_value"]) >= 3
    # the gateway's calls to productpage are mTLS too
    admin = workload(mesh, "productpage-v1-1")["admin_port"]
    text = get(f"http://127.0.0.1:{admin}/stats/prometheus")[1]
    gw = [
        r
        for r in requests_total(text)
        if r["reporter"] == "destination" and r["source_workload"] == "istio-ingressgateway"
    ]
    assert gw and all(r["connection_security_policy"] == "mutual_tls" for r in gw), gw
    assert gw[0]["source_principal"] == (
        "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    )


def test_dashboard_graph_marks_mtls_edges(mesh: MeshThread) -> None:
    assert mesh.mesh is not None and mesh.mesh.cp._scraper is not None
    scrape = mesh.mesh.cp._scraper.scrape_once
    mesh.call(scrape())
    for _ in range(3):
        assert page(mesh)[0] == 200
    mesh.call(scrape())
    status, body = admin_get(mesh, mesh.url + "/api/graph?window=300")
    assert status == 200
    edges = {(e["source"], e["target"]): e for e in json.loads(body)["edges"]}
    e = edges.get(("default/productpage-v1", "default/details-v1"))
    assert e is not None, sorted(edges)
    assert e["mtls"] is True
    gw = edges.get(("istio-system/istio-ingressgateway", "default/productpage-v1"))
    assert gw is not None and gw["mtls"] is True, sorted(edges)


INGRESS_POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-deny-flagged, namespace: istio-system}
spec:
  selector: {matchLabels: {app: istio-ingressgateway}}
  action: DENY
  rules:
  - when:
    - key: request.headers[x-blocked]
      values: ["yes"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-allow-list, namespace: istio-system}
spec:
  selector: {matchLabels: {app: istio-ingressgateway}}
  action: ALLOW
  rules:
  - from: [{source: {ipBlocks: ["IPS"]}}]
"""


def test_ingress_gateway_enforces_its_policies(mesh: MeshThread) -> None:
    """Istio's ingress tasks: policies selecting the gateway are enforced on its listener."""

    def blocked_get(flag: str) -> tuple[int, str]:
        req = urllib.request.Request(mesh.gateway_url + "/productpage", headers={"x-blocked": flag})
        try:
            with _opener.open(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    outside = INGRESS_POLICIES.replace("IPS", "10.0.0.0/8")
    try:
        mesh.apply_text(outside)
        mesh.wait_synced()
        assert page(mesh) == (403, "RBAC: access denied")  # 127.0.0.1 is not allow-listed
        mesh.apply_text(INGRESS_POLICIES.replace("IPS", "127.0.0.1/32"))
        mesh.wait_synced()
        assert page(mesh)[0] == 200
        assert blocked_get("yes") == (403, "RBAC: access denied")
        assert blocked_get("no")[0] == 200
    finally:
        mesh.delete_text(outside)
        mesh.wait_synced()
    assert blocked_get("yes")[0] == 200


def test_end_user_authentication_at_the_ingress(mesh: MeshThread) -> None:
    """Istio's JWT task: RequestAuthentication + AuthorizationPolicy on the ingress gateway."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]})
    iss = "testing@secure.istio.io"
    good = jwt.encode({"iss": iss, "sub": iss, "exp": 4685989700}, key, "ES256", {"kid": "k1"})
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"iss": iss, "sub": iss, "exp": 4685989700}, other, "ES256", {"kid": "k1"})
    policy = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-example, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules:
  - issuer: "{iss}"
    jwks: '{jwks}'
"""
    require = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-ingress, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
"""

    def with_token(token: str | None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(mesh.gateway_url + "/productpage", headers=headers)
        try:
            with _opener.open(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        mesh.apply_text(policy)
        mesh.wait_synced()
        assert with_token("deadbeef")[0] == 401
        assert with_token(forged)[0] == 401
        assert with_token(None)[0] == 200  # no token: allowed until a policy requires one
        assert with_token(good)[0] == 200
        mesh.apply_text(require)
        mesh.wait_synced()
        assert with_token(None) == (403, "RBAC: access denied")
        assert with_token(good)[0] == 200
    finally:
        mesh.delete_text(policy + "---" + require)
        mesh.wait_synced()

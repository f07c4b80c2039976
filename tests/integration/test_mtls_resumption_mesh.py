"""Resumed TLS sessions between real sidecars keep the peer's identity for authz, XFCC and
metrics: with ``maxRequestsPerConnection: 1`` every request opens a new mTLS connection, all
but the first of each client resume a session, and an AuthorizationPolicy on principals still
allows one service account and denies the other on those resumed connections."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_mtls_mesh import APPS, ECHO_APP, get, workload

from diktyo.platform.harness import MeshThread

pytestmark = pytest.mark.slow

N = 5
FRONT = "spiffe://cluster.local/ns/default/sa/front-sa"
OTHER = "spiffe://cluster.local/ns/default/sa/other-sa"

CONFIG = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello-one-request, namespace: default}
spec:
  host: hello
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 1}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hello-from-front, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/front-sa"]}}]
"""


def mesh_yaml(tmp: Path) -> Path:
    echo = tmp / "echo_app.py"
    echo.write_text(ECHO_APP)
    spec = tmp / "mesh.yaml"
    tiny = APPS / "tiny_app.py"
    spec.write_text(
        f"""
name: mtls-resume
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
  - name: front
    ports: [{{name: http, port: 9080}}]
  - name: other
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello
    labels: {{app: hello, version: v1}}
    serviceAccount: hello-sa
    command: ["{sys.executable}", "{echo}"]
  - name: front
    labels: {{app: front, version: v1}}
    serviceAccount: front-sa
    command: ["{sys.executable}", "{tiny}"]
  - name: other
    labels: {{app: other, version: v1}}
    serviceAccount: other-sa
    command: ["{sys.executable}", "{tiny}"]
"""
    )
    return spec


def scrape(admin_port: int) -> list[str]:
    status, text = get(f"http://127.0.0.1:{admin_port}/stats/prometheus")
    assert status == 200
    return text.splitlines()


def value(lines: list[str], name: str, *parts: str) -> float:
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in lines
        if (ln.startswith(name + "{") or ln.startswith(name + " ")) and all(p in ln for p in parts)
    )


def test_authz_peer_identity_and_metrics_hold_on_resumed_connections(tmp_path: Path) -> None:
    with MeshThread(mesh_yaml(tmp_path)) as mesh:
        mesh.apply_text(CONFIG)
        mesh.wait_synced()
        front, other, hello = (workload(mesh, n) for n in ("front", "other", "hello"))
        before = scrape(hello["admin_port"])
        for _ in range(N):
            status, body = get(
                f"http://127.0.0.1:{front['inbound_ports']['9080']}/call/hello:9080/e"
            )
            assert status == 200, body
            xfcc = json.loads(body)["headers"]["x-forwarded-client-cert"]
            assert xfcc.endswith(f";URI={FRONT}")
            status, body = get(
                f"http://127.0.0.1:{other['inbound_ports']['9080']}/call/hello:9080/e"
            )
            assert status == 502 and "403" in body and "RBAC: access denied" in body, body

        # each client opened N connections to hello; all but its first resumed a session
        for client in (front, other):
            lines = scrape(client["admin_port"])
            handshakes = value(lines, "envoy_cluster_ssl_handshake", "hello")
            resumed = value(lines, "envoy_cluster_ssl_session_reused", "hello")
            assert handshakes >= N and resumed >= N - 1, (handshakes, resumed)
        after = scrape(hello["admin_port"])
        resumed_in = value(after, "envoy_listener_ssl_session_reused") - value(
            before, "envoy_listener_ssl_session_reused"
        )
        assert resumed_in >= 2 * (N - 1)

        # the destination's metrics name each client's principal, mTLS, on every request
        dest = ('reporter="destination"', 'connection_security_policy="mutual_tls"')
        allowed = value(after, "istio_requests_total", *dest, FRONT, 'response_code="200"')
        denied = value(after, "istio_requests_total", *dest, OTHER, 'response_code="403"')
        assert (allowed, denied) == (N, N)
        assert value(after, "istio_requests_total", 'connection_security_policy="none"') == 0

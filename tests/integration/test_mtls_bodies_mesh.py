"""Large bodies both ways over mTLS between real sidecars (diktyo's TLS record layer): a request
body of many TLS records reaches the app whole through the inbound sidecar's protocol sniffer,
and a large response reaches the client whole, several times on one reused connection."""

from __future__ import annotations

import hashlib
import http.client
from pathlib import Path

import pytest
from test_mtls_mesh import APPS, get, workload

from diktyo.platform.harness import MeshThread
from diktyo.testing import hello_front_mesh

pytestmark = pytest.mark.slow

BODY_APP = r"""
import hashlib, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _send(self, body):
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        data = self.rfile.read(int(self.headers["content-length"]))
        self._send(f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode())
    def do_GET(self):  # /big/<n>: n bytes of a pattern
        n = int(self.path.rsplit("/", 1)[1])
        self._send((bytes(range(256)) * (n // 256 + 1))[:n])
    def log_message(self, *a):
        pass
print("listening", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


def mesh_yaml(tmp: Path) -> Path:
    app = tmp / "body_app.py"
    app.write_text(BODY_APP)
    spec = tmp / "mesh.yaml"
    spec.write_text(hello_front_mesh("mtls-bodies", app, APPS / "tiny_app.py"))
    return spec


def test_large_bodies_cross_the_mtls_hop_whole(tmp_path: Path) -> None:
    with MeshThread(mesh_yaml(tmp_path)) as mesh:
        mesh.wait_synced()
        front = workload(mesh, "front")
        hello = workload(mesh, "hello")
        conn = http.client.HTTPConnection("127.0.0.1", front["outbound_port"], timeout=10)
        try:
            for size in (300_000, 17_000, 1):  # 19 records, 2 records, 1
                body = bytes((i * 7) % 251 for i in range(size))
                conn.request("POST", "/echo", body=body, headers={"Host": "hello:9080"})
                r = conn.getresponse()
                assert r.status == 200
                assert r.read().decode() == f"{size} {hashlib.sha256(body).hexdigest()}"
            for size in (1_000_000, 40_000):
                conn.request("GET", f"/big/{size}", headers={"Host": "hello:9080"})
                r = conn.getresponse()
                assert r.status == 200
                assert r.read() == (bytes(range(256)) * (size // 256 + 1))[:size]
        finally:
            conn.close()
        # it went over mTLS: hello's sidecar counted the requests as mutual_tls from front
        status, metrics = get(f"http://127.0.0.1:{hello['admin_port']}/stats/prometheus")
        assert status == 200
        mtls = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith("istio_requests_total{")
            and 'connection_security_policy="mutual_tls"' in ln
            and 'source_workload="front"' in ln
            and 'response_code="200"' in ln
        ]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in mtls) == 5, mtls

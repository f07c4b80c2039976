"""mTLS between real sidecars of a local mesh: auto mTLS, XFCC, PeerAuthentication, RBAC, telemetry."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.testing import hello_front_mesh

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent.parent / "e2e" / "apps"

ECHO_APP = r"""
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("listening", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def mesh_yaml(tmp: Path) -> Path:
    echo = tmp / "echo_app.py"
    echo.write_text(ECHO_APP)
    spec = tmp / "mesh.yaml"
    spec.write_text(hello_front_mesh("mtls", echo, APPS / "tiny_app.py"))
    return spec


def workload(mesh: MeshThread, name: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == name)


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: hello-strict, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  mtls: {mode: STRICT}
"""

AUTHZ = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hello-from-front, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/front-sa"]}}]
    to: [{operation: {methods: ["GET"], notPaths: ["/admin*"]}}]
"""


NO_TLS_TO_HELLO = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello-plaintext, namespace: default}
spec:
  host: hello
  trafficPolicy:
    tls: {mode: DISABLE}
"""


def test_sidecars_talk_mtls_and_enforce_policies(tmp_path: Path) -> None:
    with MeshThread(mesh_yaml(tmp_path)) as mesh:
        mesh.wait_synced()
        front = workload(mesh, "front")
        hello = workload(mesh, "hello")
        front_in = front["inbound_ports"]["9080"]
        hello_in = hello["inbound_ports"]["9080"]

        # front -> hello through both sidecars: mTLS, the app sees XFCC with front's identity
        status, body = get(f"http://127.0.0.1:{front_in}/call/hello:9080/x/../echo")
        assert status == 200, body
        seen = json.loads(body)
        xfcc = seen["headers"]["x-forwarded-client-cert"]
        assert xfcc.startswith("By=spiffe://cluster.local/ns/default/sa/hello-sa;Hash=")
        assert xfcc.endswith(";URI=spiffe://cluster.local/ns/default/sa/front-sa")
        assert "x-diktyo-peer-metadata" not in seen["headers"]
        assert seen["path"] == "/echo"  # normalised on the inbound side

        # a client without a sidecar: plaintext works under PERMISSIVE (the default), no XFCC
        status, body = get(f"http://127.0.0.1:{hello_in}/plain")
        assert status == 200
        assert "x-forwarded-client-cert" not in json.loads(body)["headers"]

        # the inbound port presents the workload's certificate (SPIFFE URI SAN)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", hello_in), 5) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    tls.recv(100)
            except (ssl.SSLError, ConnectionError):
                der = der  # noqa: PLW0127 - the server may reject us after the handshake
        from diktyo.security.certs import spiffe_id_of_der

        assert spiffe_id_of_der(der) == "spiffe://cluster.local/ns/default/sa/hello-sa"

        # STRICT: plaintext is refused (connection closed), sidecar-to-sidecar still works
        mesh.apply_text(STRICT)
        mesh.wait_synced()
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            _opener.open(f"http://127.0.0.1:{hello_in}/plain", timeout=5).read()
        status, _ = get(f"http://127.0.0.1:{front_in}/call/hello:9080/echo")
        assert status == 200

        # RBAC: front's principal may GET, not /admin
        mesh.apply_text(AUTHZ)
        mesh.wait_synced()
        status, _ = get(f"http://127.0.0.1:{front_in}/call/hello:9080/echo")
        assert status == 200
        status, body = get(f"http://127.0.0.1:{front_in}/call/hello:9080/admin/x")
        assert status == 502 and "403" in body and "RBAC: access denied" in body

        # telemetry on hello's sidecar (reporter=destination)
        status, metrics = get(f"http://127.0.0.1:{hello['admin_port']}/stats/prometheus")
        lines = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith("istio_requests_total{")
            and 'source_principal="spiffe://cluster.local/ns/default/sa/front-sa"' in ln
        ]
        assert lines, metrics[:2000]
        assert any('connection_security_policy="mutual_tls"' in ln for ln in lines)
        assert any('source_workload="front"' in ln for ln in lines)
        assert any(
            'destination_principal="spiffe://cluster.local/ns/default/sa/hello-sa"' in ln
            for ln in lines
        )
        assert any('response_code="403"' in ln for ln in lines)

        # DestinationRule tls DISABLE: front's sidecar sends plaintext; STRICT refuses it
        mesh.apply_text(NO_TLS_TO_HELLO)
        mesh.wait_synced()
        status, body = get(f"http://127.0.0.1:{front_in}/call/hello:9080/echo")
        assert status == 502 and "upstream answered 503" in body, body
        # PERMISSIVE again: plaintext arrives, but without a principal the policy denies it
        mesh.delete_text(STRICT)
        mesh.wait_synced()
        status, body = get(f"http://127.0.0.1:{front_in}/call/hello:9080/echo")
        assert status == 502 and "RBAC: access denied" in body, body
        mesh.delete_text(NO_TLS_TO_HELLO)
        mesh.wait_synced()
        status, _ = get(f"http://127.0.0.1:{front_in}/call/hello:9080/echo")
        assert status == 200

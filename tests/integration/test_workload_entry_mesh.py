"""Real sidecars send traffic to WorkloadEntry endpoints selected by a ServiceEntry, by subset."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent.parent / "e2e" / "apps"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextmanager
def vm_app(name: str) -> Iterator[tuple[int, list[str]]]:
    """A plain HTTP server standing for a VM's app (no sidecar): answers its name."""
    seen: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = json.dumps({"vm": name, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def config(port_v1: int, port_v2: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings-vms}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: ratings}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: ratings-vm-1}}
spec:
  address: 127.0.0.1
  ports: {{http: {port_v1}}}
  labels: {{app: ratings, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: ratings-vm-2, labels: {{version: v2}}}}
spec:
  address: 127.0.0.1
  ports: {{http: {port_v2}}}
  labels: {{app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""


ONLY_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings, subset: v2}
"""


def test_traffic_reaches_workload_entries_and_subsets_pick_them_by_label(tmp_path: Path) -> None:
    spec = tmp_path / "mesh.yaml"
    spec.write_text(
        f"""
name: we
services:
  - name: front
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: front
    labels: {{app: front}}
    command: ["{sys.executable}", "{APPS / "tiny_app.py"}"]
"""
    )
    with vm_app("vm-1") as (p1, seen1), vm_app("vm-2") as (p2, seen2), MeshThread(spec) as mesh:
        mesh.wait_synced()
        front = next(w for w in mesh.describe()["workloads"] if w["workload"] == "front")
        front_in = front["inbound_ports"]["9080"]
        # before the ServiceEntry exists, ratings is unknown to the mesh
        status, _ = get(f"http://127.0.0.1:{front_in}/call/ratings:9080/x")
        assert status == 502

        mesh.apply_text(config(p1, p2))
        mesh.wait_synced()
        answered = set()
        for i in range(12):
            status, body = get(f"http://127.0.0.1:{front_in}/call/ratings:9080/r/{i}")
            assert status == 200, body
            answered.add(json.loads(body)["vm"])
        assert answered == {"vm-1", "vm-2"}  # both entries are endpoints of the service
        assert seen1 and seen2

        # the v2 subset is the entry whose (metadata) labels say version=v2
        mesh.apply_text(ONLY_V2)
        mesh.wait_synced()
        before = len(seen1)
        for i in range(6):
            status, body = get(f"http://127.0.0.1:{front_in}/call/ratings:9080/v2/{i}")
            assert status == 200 and json.loads(body)["vm"] == "vm-2", body
        assert len(seen1) == before

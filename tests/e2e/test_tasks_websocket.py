"""WebSocket through a local mesh with the `websockets` library: client -> outbound sidecar ->
inbound sidecar (mTLS between them) -> app, and through the ingress gateway; the connection
stays up across a config push."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from diktyo.platform.harness import MeshThread

APPS = Path(__file__).resolve().parent / "apps"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MESH = f"""
name: wsmesh
services:
  - name: echo
    ports: [{{name: http, port: 8080}}]
workloads:
  - name: echo-v1
    labels: {{app: echo, version: v1}}
    command: ["{{python}}", "{APPS / "ws_echo.py"}"]
  - name: sleep
    labels: {{app: sleep, version: v1}}
    command: ["{{python}}", "-m", "diktyo.samples.sleep"]
gateways:
  - name: istio-ingressgateway
    namespace: istio-system
    ports: [{{port: 8080, hostPort: 0}}]
"""

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: echo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: ["*"]
  gateways: [echo-gateway]
  http:
  - route:
    - destination: {host: echo, port: {number: 8080}}
"""

PUSH = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
"""


def replica(mesh: MeshThread, workload: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == workload)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshThread]:
    d = tmp_path_factory.mktemp("wsmesh")
    (d / "mesh.yaml").write_text(MESH)
    (d / "gateway.yaml").write_text(GATEWAY)
    with MeshThread(d / "mesh.yaml", gateway_host_port=0) as m:
        m.apply_file(d / "gateway.yaml")
        m.wait_synced()
        yield m


async def _session(port: int, uri: str, mesh: MeshThread | None, push: Path | None) -> list[str]:
    sock = socket.create_connection(("127.0.0.1", port))
    got: list[str] = []
    async with websockets.connect(uri, sock=sock, proxy=None) as ws:
        got.append(str(await asyncio.wait_for(ws.recv(), 10)))
        for i in range(20):
            await ws.send(f"m{i}")
            got.append(str(await asyncio.wait_for(ws.recv(), 10)))
        if mesh is not None and push is not None:
            await asyncio.to_thread(mesh.apply_file, push)
            await asyncio.to_thread(mesh.wait_synced)
            await ws.send("after push")
            got.append(str(await asyncio.wait_for(ws.recv(), 10)))
    return got


def test_websocket_from_a_sidecar_over_mtls_across_a_config_push(
    mesh: MeshThread, tmp_path: Path
) -> None:
    push = tmp_path / "push.yaml"
    push.write_text(PUSH)
    port = replica(mesh, "sleep")["outbound_port"]
    got = asyncio.run(_session(port, "ws://echo:8080/chat", mesh, push))
    assert got[0] == "hello from echo-v1-1 /chat"
    assert got[1:21] == [f"m{i}" for i in range(20)]
    assert got[21] == "after push"
    # the inbound sidecar saw it over mTLS from the sleep workload
    import urllib.request

    admin = replica(mesh, "echo-v1")["admin_port"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10).read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert any(
        'source_workload="sleep"' in ln
        and 'response_code="101"' in ln
        and 'connection_security_policy="mutual_tls"' in ln
        for ln in lines
    ), lines


def test_websocket_through_the_ingress_gateway(mesh: MeshThread) -> None:
    url = mesh.gateway_url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    got = asyncio.run(_session(port, "ws://echo.example/gw", None, None))
    assert got[0] == "hello from echo-v1-1 /gw"
    assert got[1:] == [f"m{i}" for i in range(20)]

"""gRPC routed by a Gateway API GRPCRoute (``samples/grpc/grpcroute.yaml``) through two real
sidecars: grpcio client and servers, the route's parent the ratings Service (GAMMA)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.samples.grpc_ratings import Client

HERE = Path(__file__).resolve().parents[2] / "samples" / "grpc"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def replica(mesh: MeshThread, workload: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == workload)


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(HERE / "mesh.yaml") as m:
        m.apply_file(HERE / "grpcroute.yaml")
        m.wait_synced()
        yield m


@pytest.fixture
def client(mesh: MeshThread) -> Iterator[Client]:
    c = Client(f"127.0.0.1:{replica(mesh, 'sleep')['outbound_port']}", "ratings:7070")
    yield c
    c.close()


def test_metadata_and_method_matches_route_to_v2(client: Client) -> None:
    md = (("x-user", "jason"),)
    assert {client.get({"product": i}, metadata=md, timeout=20)["version"] for i in range(8)} == {
        "v2"
    }
    for _ in range(4):  # the streaming method, whatever the metadata
        assert {m["version"] for m in client.watch({"count": 3}, timeout=20)} == {"v2"}


def test_other_calls_are_split_and_get_the_rules_response_header(client: Client) -> None:
    versions: Counter[str] = Counter()
    for i in range(40):
        resp, call = client.get.with_call({"product": i}, timeout=20)
        versions[resp["version"]] += 1
        assert dict(call.initial_metadata()).get("x-route") == "split"  # ResponseHeaderModifier
    # 50/50 over 40 calls: both versions (all on one side: p = 2 x 2^-40)
    assert set(versions) == {"v1", "v2"}, versions
    resp, call = client.get.with_call({"product": 1}, metadata=(("x-user", "jason"),), timeout=20)
    assert "x-route" not in dict(call.initial_metadata())  # the jason rule has no filter


INGRESS = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: grpc-gateway}
spec:
  gatewayClassName: istio
  listeners:
  - {name: grpc, port: 80, protocol: HTTP, hostname: "*.example.com"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings-ingress}
spec:
  parentRefs: [{name: grpc-gateway}]
  hostnames: [ratings.example.com]
  rules:
  - matches: [{method: {service: ratings.Ratings, method: Get}}]
    backendRefs: [{name: ratings-v2, port: 7070}]
"""
GATEWAYS = """
gateways:
  - name: istio-ingressgateway
    namespace: istio-system
    labels: {istio: ingressgateway, app: istio-ingressgateway}
    ports:
      - {port: 80, hostPort: 8080}
"""


def test_ingress_gateway_routes_grpc_by_method(tmp_path: Path) -> None:
    """gRPC from outside the mesh: h2c to the ingress gateway, a Gateway API Gateway and a
    GRPCRoute for ``ratings.example.com``; only the method the route names is served."""
    import grpc

    (tmp_path / "mesh.yaml").write_text((HERE / "mesh.yaml").read_text() + GATEWAYS)
    (tmp_path / "ingress.yaml").write_text(INGRESS)
    with MeshThread(tmp_path / "mesh.yaml", gateway_host_port=0) as m:
        m.apply_file(tmp_path / "ingress.yaml")
        m.wait_synced()
        target = m.gateway_url.removeprefix("http://")
        c = Client(target, "ratings.example.com")
        try:
            for i in range(6):  # all to ratings-v2 (the ratings Service would be half v1)
                resp, call = c.get.with_call({"product": i}, timeout=20)
                assert resp["version"] == "v2" and resp["product"] == i
                assert dict(call.trailing_metadata())["x-served-by"].startswith("ratings-v2")
            with pytest.raises(grpc.RpcError) as err:  # no rule for Watch: 404 NR, in gRPC
                list(c.watch({"count": 2}, timeout=20))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value
        finally:
            c.close()

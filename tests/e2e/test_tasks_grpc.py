"""gRPC through two sidecars on a local mesh (``samples/grpc``): real grpcio client and servers.

The sleep workload's sidecar takes h2c from the client, routes on ``:authority`` and gRPC
metadata, and forwards over mTLS (ALPN ``istio-h2``) to the ratings sidecar, which speaks
HTTP/2 to the grpcio server (port ``grpc``). The same routing with the Gateway API
(``grpcroute.yaml``, a GRPCRoute whose parent is the ratings Service) replaces the
VirtualService while its tests run; a GRPCRoute at the ingress gateway has its own mesh.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from diktyo.platform.harness import MeshThread
from diktyo.samples.grpc_ratings import Client
from diktyo.testing import eventually_sync

HERE = Path(__file__).resolve().parents[2] / "samples" / "grpc"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def replica(mesh: MeshThread, workload: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == workload)


def prometheus(mesh: MeshThread, workload: str) -> str:
    url = f"http://127.0.0.1:{replica(mesh, workload)['admin_port']}/stats/prometheus"
    with _opener.open(url, timeout=10) as r:
        return str(r.read().decode())


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(HERE / "mesh.yaml") as m:
        m.apply_file(HERE / "ratings.yaml")
        m.wait_synced()
        yield m


@pytest.fixture
def client(mesh: MeshThread) -> Iterator[Client]:
    c = Client(f"127.0.0.1:{replica(mesh, 'sleep')['outbound_port']}", "ratings:7070")
    yield c
    c.close()


def test_unary_and_streaming_calls_through_two_sidecars(client: Client) -> None:
    resp, call = client.get.with_call({"product": 3}, timeout=20)
    assert resp["product"] == 3 and resp["version"] in ("v1", "v2")
    trailing = dict(call.trailing_metadata())
    assert trailing["x-served-by"].startswith("ratings-")  # trailers pass both hops
    assert [m["seq"] for m in client.watch({"count": 5}, timeout=20)] == [0, 1, 2, 3, 4]
    assert client.record(iter([{"s": i} for i in range(7)]), timeout=20)["received"] == 7
    out = list(client.chat(iter([{"n": i} for i in range(4)]), timeout=20))
    assert [m["n"] for m in out] == [0, 1, 2, 3]


def test_stream_messages_are_counted(mesh: MeshThread, client: Client) -> None:
    def totals(name: str) -> float:
        return sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in prometheus(mesh, "sleep").splitlines()
            if ln.startswith(name + "{") and 'reporter="source"' in ln
        )

    req0 = totals("istio_request_messages_total")
    resp0 = totals("istio_response_messages_total")
    out = list(client.chat(iter([{"n": i} for i in range(6)]), timeout=20))
    assert len(out) == 6
    assert client.record(iter([{"s": i} for i in range(3)]), timeout=20)["received"] == 3
    assert totals("istio_request_messages_total") - req0 == 6 + 3
    assert totals("istio_response_messages_total") - resp0 == 6 + 1


def test_metadata_routes_to_v2(client: Client) -> None:
    md = (("x-user", "jason"),)
    versions = {client.get({"product": i}, metadata=md, timeout=20)["version"] for i in range(10)}
    assert versions == {"v2"}


def test_error_status_passes_through_and_is_counted(mesh: MeshThread, client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.get(
            {"product": 1}, metadata=(("fail", "not_found"), ("x-user", "jason")), timeout=20
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    text = prometheus(mesh, "ratings-v2")
    lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("istio_requests_total{") and 'reporter="destination"' in ln
    ]
    assert any('grpc_response_status="5"' in ln for ln in lines), lines
    assert any('request_protocol="grpc"' in ln for ln in lines), lines


def source_lines(mesh: MeshThread) -> list[str]:
    return [
        ln
        for ln in prometheus(mesh, "sleep").splitlines()
        if ln.startswith("istio_requests_total{") and 'reporter="source"' in ln
    ]


FAULT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match:
    - headers:
        x-user: {exact: faulty}
    fault:
      abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}
    route:
    - destination: {host: ratings, subset: v1}
  - match:
    - headers:
        x-user: {exact: slow}
    timeout: 30s
    route:
    - destination: {host: ratings, subset: v1}
  - match:
    - headers:
        x-user: {exact: nowhere}
    route:
    - destination: {host: ratings, subset: v9}
  - route:
    - destination: {host: ratings, subset: v1}
    retries:
      attempts: 3
      retryOn: unavailable
"""


def test_proxy_replies_are_grpc_shaped(mesh: MeshThread, client: Client, tmp_path: Path) -> None:
    f = tmp_path / "fault.yaml"
    f.write_text(FAULT)
    mesh.apply_file(f)
    mesh.wait_synced()
    try:
        # fault.abort.grpcStatus: the client sees that gRPC status, HTTP 200 underneath
        with pytest.raises(grpc.RpcError) as err:
            client.get({"product": 1}, metadata=(("x-user", "faulty"),), timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fault filter abort" in err.value.details()
        # no endpoints in subset v9: 503 UH becomes UNAVAILABLE with the cause in grpc-message
        with pytest.raises(grpc.RpcError) as err:
            client.get({"product": 1}, metadata=(("x-user", "nowhere"),), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy upstream" in err.value.details()
        # retryOn: unavailable - v1 answers UNAVAILABLE every time: 1 try + 3 retries
        before = served_v1(mesh)
        with pytest.raises(grpc.RpcError) as err:
            client.get({"product": 1}, metadata=(("fail", "unavailable"),), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert served_v1(mesh) - before == 4
        lines = source_lines(mesh)
        assert any(
            'response_code="200"' in ln
            and 'response_flags="FI"' in ln
            and 'grpc_response_status="8"' in ln
            for ln in lines
        ), lines
    finally:
        mesh.apply_file(HERE / "ratings.yaml")
        mesh.wait_synced()


def served_v1(mesh: MeshThread) -> float:
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in prometheus(mesh, "ratings-v1").splitlines()
        if ln.startswith("istio_requests_total{") and 'reporter="destination"' in ln
    )


@pytest.fixture
def grpcroute(mesh: MeshThread) -> Iterator[None]:
    """``grpcroute.yaml`` applied for one test: the GRPCRoute replaces the VirtualService."""
    mesh.apply_file(HERE / "grpcroute.yaml")
    mesh.wait_synced()
    yield
    mesh.delete_text((HERE / "grpcroute.yaml").read_text())
    mesh.wait_synced()


@pytest.mark.usefixtures("grpcroute")
def test_grpcroute_metadata_and_method_matches_route_to_v2(client: Client) -> None:
    md = (("x-user", "jason"),)
    assert {client.get({"product": i}, metadata=md, timeout=20)["version"] for i in range(8)} == {
        "v2"
    }
    for _ in range(4):  # the streaming method, whatever the metadata
        assert {m["version"] for m in client.watch({"count": 3}, timeout=20)} == {"v2"}


@pytest.mark.usefixtures("grpcroute")
def test_grpcroute_splits_other_calls_and_sets_the_rules_response_header(
    client: Client,
) -> None:
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


def test_grpcroute_at_the_ingress_gateway_routes_by_method(tmp_path: Path) -> None:
    """gRPC from outside the mesh: h2c to the ingress gateway, a Gateway API Gateway and a
    GRPCRoute for ``ratings.example.com``; only the method the route names is served."""
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


MIRRORED = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings-mirrored}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings-v1, port: 7070}}
    backendRefs: [{name: ratings-v2, port: 7070}]
"""


def test_grpcroute_request_mirror_copies_calls_to_v1(mesh: MeshThread, client: Client) -> None:
    """Every call is answered by v2 and copied to v1 (whose answers are dropped)."""
    mesh.apply_text(MIRRORED, "<mirrored>")
    mesh.wait_synced()
    try:
        before = served_v1(mesh)
        for i in range(5):
            assert client.get({"product": i}, timeout=20)["version"] == "v2"
        assert {m["version"] for m in client.watch({"count": 2}, timeout=20)} == {"v2"}
        eventually_sync(lambda: served_v1(mesh) - before >= 6, timeout=10, what="6 mirrored calls")
    finally:
        mesh.delete_text(MIRRORED)
        mesh.wait_synced()

"""Kubernetes Services in a config folder feed the registry and destination port selection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diktyo.api import load_text
from diktyo.control.standalone import snapshot_from_dir
from diktyo.control.translate.registry import (
    registry_from_kube_services,
    registry_from_service_entries,
)
from diktyo.proxy.router.simulate import simulate

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "istio"
BOOKINFO_KUBE = SHARED / "samples" / "bookinfo" / "platform" / "kube" / "bookinfo.yaml"

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http-main, port: 8000, targetPort: 8080}
  - {name: admin, port: 9000, appProtocol: http, targetPort: admin-port}
  - {name: db, port: 5432}
  - {name: dns, port: 53, protocol: UDP}
  - {name: grpc-api, port: 7000, appProtocol: tcp}
"""


def test_service_ports_names_target_ports_and_protocols_as_istio() -> None:
    result = load_text(SERVICES, "svc.yaml")
    assert result.errors == []
    (svc,) = registry_from_kube_services(result.resources).services
    assert svc.hostname == "web.shop.svc.cluster.local" and svc.short_name == "web"
    got = [(p.number, p.name, p.protocol, p.target_port) for p in svc.ports]
    assert got == [
        (8000, "http-main", "HTTP", 8080),  # protocol from the name prefix
        (9000, "admin", "HTTP", None),  # appProtocol wins; named targetPort has no number
        (5432, "db", "TCP", None),  # unknown prefix: TCP
        (7000, "grpc-api", "TCP", None),  # appProtocol tcp beats the grpc- prefix
    ]  # the UDP port is not proxied


def test_kubernetes_service_wins_over_service_entry_for_the_same_host() -> None:
    se = (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: web, "
        "namespace: shop}\nspec:\n  hosts: [web.shop.svc.cluster.local, api.example.com]\n"
        "  location: MESH_EXTERNAL\n  resolution: DNS\n  ports: [{number: 80, name: http}]\n"
    )
    result = load_text(SERVICES + "---\n" + se, "both.yaml")
    reg = registry_from_service_entries(result.resources)
    by_host = {s.hostname: s for s in reg.services}
    assert by_host["web.shop.svc.cluster.local"].ports[0].number == 8000
    assert [p.number for p in by_host["api.example.com"].ports] == [80]


ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
"""


@pytest.mark.skipif(not BOOKINFO_KUBE.exists(), reason=f"{BOOKINFO_KUBE} missing")
def test_destination_without_port_takes_the_bookinfo_service_port(tmp_path: Path) -> None:
    (tmp_path / "route.yaml").write_text(ROUTE)
    before = simulate(snapshot_from_dir(tmp_path), "GET", "http://reviews/reviews/0")
    assert before["destination"]["port"] == 80  # no Service: nothing says 9080
    shutil.copy(BOOKINFO_KUBE, tmp_path / "bookinfo.yaml")
    res = simulate(snapshot_from_dir(tmp_path), "GET", "http://reviews:9080/reviews/0")
    assert res["destination"] == {
        "host": "reviews.default.svc.cluster.local",
        "subset": "v1",
        "port": 9080,
    }
    assert res["cluster"] == "outbound|9080|v1|reviews.default.svc.cluster.local"
    bare = simulate(snapshot_from_dir(tmp_path), "GET", "http://reviews/reviews/0")
    assert bare["cluster"] == res["cluster"]  # one HTTP port: the bare name reaches it too


def test_multi_port_service_routes_per_port(tmp_path: Path) -> None:
    (tmp_path / "svc.yaml").write_text(SERVICES)
    (tmp_path / "vs.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: web, namespace: shop}\nspec:\n  hosts: [web]\n  http:\n"
        "  - route:\n    - destination: {host: web}\n"
    )
    snap = snapshot_from_dir(tmp_path)
    main = simulate(snap, "GET", "http://web.shop.svc.cluster.local:8000/")
    admin = simulate(snap, "GET", "http://web.shop.svc.cluster.local:9000/")
    assert main["cluster"] == "outbound|8000||web.shop.svc.cluster.local"
    assert admin["cluster"] == "outbound|9000||web.shop.svc.cluster.local"
    db = simulate(snap, "GET", "http://web.shop.svc.cluster.local:5432/")
    assert db["result"].startswith("404 NR")  # a TCP port has no HTTP routes


def test_a_gateway_api_gateway_is_not_taken_for_istios() -> None:
    from dataclasses import replace

    from diktyo.control.model import Registry
    from diktyo.control.translate.hosts import ConfigIndex

    gw = load_text(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n"
        "  selector: {istio: ingressgateway}\n  servers:\n"
        "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n"
    ).resources[0]
    # what a Gateway API row with a model would produce: same kind name, other group
    other = replace(gw, api_version="gateway.networking.k8s.io/v1", name="k8s")
    idx = ConfigIndex.build([gw, other], Registry())
    assert [g.name for g in idx.gateways] == ["g"]

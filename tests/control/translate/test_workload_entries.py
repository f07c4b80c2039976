"""WorkloadEntries selected by a ServiceEntry's workloadSelector become endpoints, as in Istio."""

from __future__ import annotations

from diktyo.api import load_text
from diktyo.control.model import ProxyNode, PushContext, Registry
from diktyo.control.translate import translate
from diktyo.snapshot.model import Node

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings-vm, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 9080, name: http, targetPort: 7000}
  - {number: 9090, name: grpc-admin}
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-a, namespace: shop, labels: {version: v2}}
spec:
  address: 10.1.0.5
  ports: {http: 8080}
  labels: {app: ratings, version: v1}
  serviceAccount: ratings-sa
  locality: eu-west/zone-b/rack-1
  network: vpc-1
  weight: 3
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-b, namespace: shop}
spec:
  address: 10.1.0.6
  labels: {app: ratings, version: v1, security.istio.io/tlsMode: disabled}
  serviceAccount: ratings-sa
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-app, namespace: shop}
spec: {address: 10.1.0.7, labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-namespace, namespace: default}
spec: {address: 10.1.0.8, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: not-an-ip, namespace: shop}
spec: {address: vm.example.com, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: vpc, labels: {topology.istio.io/network: vpc-1}}
"""


def _snapshot(text: str) -> dict[str, object]:
    result = load_text(text, "mesh.yaml")
    assert result.ok, [str(e) for e in result.errors]
    proxy = ProxyNode(node=Node(id="client.shop", workload="client", namespace="shop"))
    snap = translate(proxy, PushContext(tuple(result.resources), Registry()))
    return {c.name: c for c in snap.clusters}


def test_selected_entries_are_endpoints_with_istio_ports_weight_labels_and_identity() -> None:
    clusters = _snapshot(MESH)
    eps = {
        e.address: e for e in clusters["outbound|9080||ratings.shop.svc.cluster.local"].endpoints
    }
    # same namespace, matching labels, IP address only
    assert sorted(eps) == ["10.1.0.5", "10.1.0.6"]
    a, b = eps["10.1.0.5"], eps["10.1.0.6"]
    assert a.port == 8080  # the entry's ports[name] wins over targetPort
    assert b.port == 7000  # no entry port: the ServiceEntry's targetPort
    grpc = clusters["outbound|9090||ratings.shop.svc.cluster.local"].endpoints
    assert sorted(e.port for e in grpc) == [9090, 9090]  # neither: the port number itself
    assert a.weight == 3 and b.weight == 1
    assert a.labels["version"] == "v2"  # metadata.labels win over spec.labels
    assert a.labels["topology.kubernetes.io/region"] == "eu-west"
    assert a.labels["topology.kubernetes.io/zone"] == "zone-b"
    assert a.labels["topology.istio.io/subzone"] == "rack-1"
    assert a.labels["topology.istio.io/network"] == "vpc-1"
    # a service account means a sidecar: mTLS with its SPIFFE identity; the label overrides
    assert a.has_sidecar and a.principal == "spiffe://cluster.local/ns/shop/sa/ratings-sa"
    assert not b.has_sidecar and b.principal == ""
    assert a.workload == "vm-a" and a.namespace == "shop"


def test_subsets_select_entries_by_their_labels() -> None:
    clusters = _snapshot(MESH)
    host = "ratings.shop.svc.cluster.local"
    v1 = [e.address for e in clusters[f"outbound|9080|v1|{host}"].endpoints]
    v2 = [e.address for e in clusters[f"outbound|9080|v2|{host}"].endpoints]
    vpc = [e.address for e in clusters[f"outbound|9080|vpc|{host}"].endpoints]
    assert v1 == ["10.1.0.6"] and v2 == ["10.1.0.5"] and vpc == ["10.1.0.5"]


HEALTH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5000, name: http}]
  workloadSelector: {labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: checked-healthy
  namespace: shop
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec: {address: 10.2.0.1, labels: {app: db}}
status:
  conditions: [{type: Healthy, status: "True"}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: checked-failing
  namespace: shop
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec: {address: 10.2.0.2, labels: {app: db}}
status:
  conditions: [{type: Healthy, status: "False", message: "HTTP probe failed"}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: checked-not-yet
  namespace: shop
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec: {address: 10.2.0.3, labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: unchecked, namespace: shop}
spec: {address: 10.2.0.4, labels: {app: db}}
"""


def test_health_checked_entries_are_endpoints_only_while_healthy() -> None:
    clusters = _snapshot(HEALTH)
    eps = clusters["outbound|5000||db.shop.svc.cluster.local"].endpoints
    assert sorted(e.address for e in eps) == ["10.2.0.1", "10.2.0.4"]


def test_dns_service_entry_with_selector_does_not_dial_its_host() -> None:
    text = MESH.replace("resolution: STATIC", "resolution: DNS")
    clusters = _snapshot(text)
    eps = clusters["outbound|9080||ratings.shop.svc.cluster.local"].endpoints
    # with a selector the host is not an endpoint of its own; DNS entries may use names
    assert sorted(e.address for e in eps) == ["10.1.0.5", "10.1.0.6", "vm.example.com"]


KUBE = """
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec:
  selector: {app: ratings}
  ports:
  - {name: http, port: 9080, targetPort: 7070}
  - {name: metrics, port: 9090}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-a, namespace: shop}
spec: {address: 10.3.0.1, ports: {metrics: 19090}, labels: {app: ratings}, serviceAccount: r}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-other, namespace: shop}
spec: {address: 10.3.0.2, labels: {app: reviews}}
"""


def test_a_kubernetes_service_selector_selects_workload_entries_too() -> None:
    clusters = _snapshot(KUBE)
    http = clusters["outbound|9080||ratings.shop.svc.cluster.local"].endpoints
    metrics = clusters["outbound|9090||ratings.shop.svc.cluster.local"].endpoints
    assert [(e.address, e.port) for e in http] == [("10.3.0.1", 7070)]  # targetPort
    assert [(e.address, e.port) for e in metrics] == [("10.3.0.1", 19090)]  # the entry's port
    assert http[0].principal == "spiffe://cluster.local/ns/shop/sa/r"

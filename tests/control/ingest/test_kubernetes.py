"""Kubernetes registry ingest on recorded API objects (``kubectl get ... -o yaml`` shapes).

No cluster: the objects below are written in the exact shape the API server returns (List
objects whose items carry no kind, EndpointSlice discovery.k8s.io/v1 with conditions and
targetRef). The list+watch client runs against a server replaying recorded list/watch
responses (bookmarks, 410 Gone, a 503) on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from diktyo.control.ingest.kubernetes import (
    KubeWatcher,
    config_from_objects,
    port_protocol,
    registry_from_objects,
    service_from_object,
    workload_name,
)
from diktyo.control.inject.manifest import load_docs
from diktyo.control.model import Registry, ServicePort

RECORDED = """\
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: reviews
    namespace: default
    labels: {app: reviews, service: reviews}
    resourceVersion: "1021"
    uid: 5f1c3a1e-8a2d-4b6f-9c2e-1d0e3f4a5b6c
  spec:
    clusterIP: 10.96.120.7
    clusterIPs: [10.96.120.7]
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      port: 9080
      protocol: TCP
      targetPort: 9080
    selector: {app: reviews}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    name: shop
    namespace: shop
    resourceVersion: "2044"
  spec:
    clusterIP: 10.96.7.9
    ports:
    - name: web
      appProtocol: http
      port: 80
      protocol: TCP
      targetPort: http-web
    - name: grpc-api
      port: 9090
      protocol: TCP
      targetPort: 9090
    - name: dns
      port: 53
      protocol: UDP
      targetPort: 53
    selector: {app.kubernetes.io/name: shop}
    type: ClusterIP
- apiVersion: v1
  kind: Service
  metadata:
    name: db
    namespace: shop
  spec:
    clusterIP: None
    ports:
    - name: tcp-postgres
      port: 5432
      protocol: TCP
      targetPort: 5432
    selector: {app: db}
    type: ClusterIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSliceList
metadata:
  resourceVersion: "3100"
items:
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses: [10.244.1.12]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-a
    targetRef: {kind: Pod, name: reviews-v1-7d8b9c6f5-x2k4p, namespace: default, uid: 11111111-aaaa-4bbb-8ccc-000000000001}
    zone: zone-a
  - addresses: [10.244.2.7]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-b
    targetRef: {kind: Pod, name: reviews-v2-5b667bcbf8-q9w8e, namespace: default, uid: 11111111-aaaa-4bbb-8ccc-000000000002}
    zone: zone-b
  - addresses: [10.244.2.9]
    conditions: {ready: false, serving: false, terminating: false}
    nodeName: node-b
    targetRef: {kind: Pod, name: reviews-v3-6f9b8d7c4-m3n4b, namespace: default, uid: 11111111-aaaa-4bbb-8ccc-000000000003}
    zone: zone-b
  kind: EndpointSlice
  metadata:
    generateName: reviews-
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: reviews
    name: reviews-8vdfq
    namespace: default
    ownerReferences:
    - {apiVersion: v1, blockOwnerDeletion: true, controller: true, kind: Service, name: reviews, uid: 5f1c3a1e-8a2d-4b6f-9c2e-1d0e3f4a5b6c}
    resourceVersion: "3001"
  ports:
  - {name: http, port: 9080, protocol: TCP}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses: [10.244.3.4]
    conditions: {ready: true, serving: true, terminating: false}
    targetRef: {kind: Pod, name: shop-0, namespace: shop}
  - addresses: [10.244.3.5]
    conditions: {ready: false, serving: true, terminating: true}
    targetRef: {kind: Pod, name: shop-1, namespace: shop}
  kind: EndpointSlice
  metadata:
    labels: {kubernetes.io/service-name: shop}
    name: shop-abcde
    namespace: shop
  ports:
  - {name: web, port: 8080, protocol: TCP}
  - {name: grpc-api, port: 9090, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses: [10.244.9.9]
    conditions: {ready: true}
  kind: EndpointSlice
  metadata:
    labels: {kubernetes.io/service-name: gone}
    name: gone-zzzzz
    namespace: default
  ports:
  - {name: http, port: 80, protocol: TCP}
- addressType: FQDN
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses: [db.example.com]
  kind: EndpointSlice
  metadata:
    labels: {kubernetes.io/service-name: db}
    name: db-fqdn
    namespace: shop
  ports:
  - {name: tcp-postgres, port: 5432}
---
apiVersion: v1
kind: PodList
metadata:
  resourceVersion: "3200"
items:
- metadata:
    name: reviews-v1-7d8b9c6f5-x2k4p
    namespace: default
    labels: {app: reviews, version: v1, pod-template-hash: 7d8b9c6f5}
    ownerReferences:
    - {apiVersion: apps/v1, controller: true, kind: ReplicaSet, name: reviews-v1-7d8b9c6f5, uid: r1}
  spec:
    serviceAccountName: bookinfo-reviews
    containers:
    - {name: reviews, image: reviews:v1}
  status:
    phase: Running
    podIP: 10.244.1.12
    podIPs: [{ip: 10.244.1.12}]
- metadata:
    name: reviews-v2-5b667bcbf8-q9w8e
    namespace: default
    labels: {app: reviews, version: v2, security.istio.io/tlsMode: istio}
    annotations:
      sidecar.istio.io/status: '{"initContainers":["diktyo-init"],"containers":["diktyo-proxy"]}'
    ownerReferences:
    - {apiVersion: apps/v1, controller: true, kind: ReplicaSet, name: reviews-v2-5b667bcbf8, uid: r2}
  spec:
    serviceAccountName: bookinfo-reviews
    containers:
    - {name: reviews, image: reviews:v2}
    - {name: diktyo-proxy, image: diktyo/diktyo:0.1.0}
  status:
    podIP: 10.244.2.7
- metadata:
    name: reviews-v3-6f9b8d7c4-m3n4b
    namespace: default
    labels: {app: reviews, version: v3}
    ownerReferences:
    - {apiVersion: apps/v1, controller: true, kind: ReplicaSet, name: reviews-v3-6f9b8d7c4, uid: r3}
  spec:
    serviceAccount: legacy-sa
    containers:
    - {name: reviews, image: reviews:v3}
  status:
    podIP: 10.244.2.9
- metadata:
    name: shop-0
    namespace: shop
    labels: {app.kubernetes.io/name: shop}
    ownerReferences:
    - {apiVersion: apps/v1, controller: true, kind: StatefulSet, name: shop, uid: s1}
  spec:
    containers:
    - {name: shop, image: shop:2.1}
  status:
    podIP: 10.244.3.4
"""


@pytest.fixture(scope="module")
def registry():  # type: ignore[no-untyped-def]
    return registry_from_objects(load_docs(RECORDED))


def test_services_fqdn_and_ports(registry) -> None:  # type: ignore[no-untyped-def]
    by_host = {s.hostname: s for s in registry.services}
    assert sorted(by_host) == ["db.shop.svc.cluster.local", "reviews.default.svc.cluster.local",
                               "shop.shop.svc.cluster.local"]
    reviews = by_host["reviews.default.svc.cluster.local"]
    assert reviews.short_name == "reviews" and reviews.namespace == "default"
    assert reviews.ports == (ServicePort(9080, "http", "HTTP", 9080),)
    shop = by_host["shop.shop.svc.cluster.local"]
    # the UDP port is left out: it is not proxied (Istio captures TCP only)
    assert shop.ports == (ServicePort(80, "web", "HTTP", None), ServicePort(9090, "grpc-api", "GRPC", 9090))
    assert by_host["db.shop.svc.cluster.local"].resolution == "NONE"  # headless
    assert by_host["db.shop.svc.cluster.local"].ports[0].protocol == "TCP"


def test_endpoints_with_pod_metadata(registry) -> None:  # type: ignore[no-untyped-def]
    inst = {i.address: i for i in registry.instances}
    assert sorted(inst) == ["10.244.1.12", "10.244.2.7", "10.244.2.9", "10.244.3.4", "10.244.3.5"]
    v1, v2, v3 = inst["10.244.1.12"], inst["10.244.2.7"], inst["10.244.2.9"]
    assert v1.name == "reviews-v1-7d8b9c6f5-x2k4p" and v1.workload == "reviews-v1"
    assert v1.labels["version"] == "v1" and v1.service_account == "bookinfo-reviews"
    assert v1.services == ("reviews.default.svc.cluster.local",) and v1.ports == {9080: 9080}
    assert v1.healthy and not v1.has_sidecar
    assert v2.has_sidecar and v2.healthy
    assert not v3.healthy and v3.service_account == "legacy-sa"
    shop0, shop1 = inst["10.244.3.4"], inst["10.244.3.5"]
    assert shop0.ports == {80: 8080, 9090: 9090} and shop0.workload == "shop"
    assert shop0.namespace == "shop" and shop0.labels == {"app.kubernetes.io/name": "shop"}
    assert not shop1.healthy  # terminating, not ready
    assert shop1.labels == {} and shop1.workload == "shop-1"  # pod not in the recording


def test_slices_of_unknown_services_and_fqdn_slices_ignored(registry) -> None:  # type: ignore[no-untyped-def]
    assert "10.244.9.9" not in {i.address for i in registry.instances}
    assert "db.example.com" not in {i.address for i in registry.instances}


def test_single_objects_and_shared_address() -> None:
    objs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"},
         "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "x"},
         "spec": {"ports": [{"name": "http", "port": 81, "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": "a-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "a"}},
         "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"name": "http", "port": 8080}]},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": "b-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "b"}},
         "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
         "ports": [{"name": "http", "port": 8080}]},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ab", "namespace": "x", "labels": {"app": "ab"}},
         "spec": {"containers": [{"name": "c"}]}, "status": {"podIP": "10.0.0.1"}},
    ]
    reg = registry_from_objects(objs, domain="corp.local")
    assert [s.hostname for s in reg.services] == ["a.x.svc.corp.local", "b.x.svc.corp.local"]
    (one,) = reg.instances
    assert one.services == ("a.x.svc.corp.local", "b.x.svc.corp.local")
    assert one.ports == {80: 8080, 81: 8080}
    assert one.healthy  # no conditions.ready means ready (API convention: nil = unknown -> ready)
    assert one.labels == {"app": "ab"}  # found by pod IP without targetRef


@pytest.mark.parametrize(
    ("name", "app", "transport", "want"),
    [("http", None, "TCP", "HTTP"), ("http-web", None, "TCP", "HTTP"), ("HTTP2-x", None, "TCP", "HTTP2"),
     ("grpc", None, "TCP", "GRPC"), ("grpc-web", None, "TCP", "GRPC"), ("https", None, "TCP", "HTTPS"),
     ("tls-db", None, "TCP", "TLS"), ("tcp", None, "TCP", "TCP"), ("mongo", None, "TCP", "TCP"),
     ("web", "http", "TCP", "HTTP"), ("x", "kubernetes.io/h2c", "TCP", "HTTP2"), ("x", "grpc", "TCP", "GRPC"),
     ("httpfoo", None, "TCP", "TCP"), (None, None, "TCP", "TCP"), ("http", None, "UDP", "UDP"),
     ("http", "unknown-proto", "TCP", "HTTP")],
)
def test_port_protocol(name: str | None, app: str | None, transport: str, want: str) -> None:
    assert port_protocol(name, app, transport) == want


def test_workload_name_from_owner() -> None:
    assert workload_name({"metadata": {"name": "p", "ownerReferences": [
        {"kind": "ReplicaSet", "name": "web-v1-5d9f", "controller": True}]}}) == "web-v1"
    assert workload_name({"metadata": {"name": "p", "ownerReferences": [
        {"kind": "Job", "name": "report-28811520", "controller": True}]}}) == "report"
    assert workload_name({"metadata": {"generateName": "x-"}}) == "x"
    assert service_from_object({"metadata": {}}) is None


# --------------------------------------------------------------------------- list+watch replay

def _svc(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
            "spec": {"ports": [{"name": "http", "port": 9080, "protocol": "TCP", "targetPort": 9080}]}}


def _slice(rv: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "reviews-abc", "namespace": "default", "resourceVersion": rv,
                         "labels": {"kubernetes.io/service-name": "reviews"}},
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]}


class ReplayApiServer:
    """Replays recorded list/watch responses of the Kubernetes API on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], str]] = []
        self.stop = asyncio.Event()
        self.service_lists = 0
        self.pod_lists = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/services", self.services)
        app.router.add_get("/apis/discovery.k8s.io/v1/endpointslices", self.slices)
        app.router.add_get("/api/v1/pods", self.pods)
        app.router.add_get("/apis/{group}/v1/{plural}", self.istio)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def close(self) -> None:
        self.stop.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def _log(self, request: web.Request) -> None:
        self.requests.append((request.path, dict(request.query), request.headers.get("Authorization", "")))

    async def _stream(self, request: web.Request, events: list[dict[str, Any]], hang: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for event in events:
            await resp.write(json.dumps(event).encode() + b"\n")
        if hang:
            await self.stop.wait()
        return resp

    async def services(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        q = request.query
        if "watch" not in q:
            self.service_lists += 1
            if self.service_lists == 1:
                return web.json_response({"kind": "ServiceList", "apiVersion": "v1",
                                          "metadata": {"resourceVersion": "100"}, "items": [_svc("reviews", "90")]})
            return web.json_response({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "200"},
                                      "items": [_svc("reviews", "90"), _svc("ratings", "110"), _svc("details", "190")]})
        rv = q["resourceVersion"]
        if rv == "100":  # a bookmark, one addition, then the server ends the watch
            return await self._stream(request, [
                {"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": "105"}}},
                {"type": "ADDED", "object": _svc("ratings", "110")}], hang=False)
        if rv == "110":  # too old by now: 410 Gone as an ERROR event -> relist
            return await self._stream(request, [{"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "too old resource version: 110 (150)", "reason": "Expired", "code": 410}}], hang=False)
        return await self._stream(request, [], hang=True)

    async def slices(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        if "watch" not in request.query:
            return web.json_response({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                      "metadata": {"resourceVersion": "100"},
                                      "items": [_slice("95", "10.0.0.1")]})
        if request.query["resourceVersion"] == "100":
            return await self._stream(request, [
                {"type": "MODIFIED", "object": _slice("120", "10.0.0.1", "10.0.0.2")}], hang=True)
        return await self._stream(request, [], hang=True)

    async def pods(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        if "watch" not in request.query:
            self.pod_lists += 1
            if self.pod_lists == 1:  # the API server is briefly unavailable
                return web.json_response({"kind": "Status", "code": 503}, status=503)
            return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "100"},
                                      "items": [{"metadata": {"name": "reviews-v1-0", "namespace": "default",
                                                              "labels": {"app": "reviews", "version": "v1"}},
                                                 "spec": {"serviceAccountName": "bookinfo-reviews",
                                                          "containers": [{"name": "reviews"}]},
                                                 "status": {"podIP": "10.0.0.1"}}]})
        return await self._stream(request, [], hang=True)


    async def istio(self, request: web.Request) -> web.StreamResponse:
        self._log(request)
        plural = request.match_info["plural"]
        items = [_vs("v1", "300")] if plural == "virtualservices" else []
        if "watch" not in request.query:
            return web.json_response({"kind": "List", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": "300"}, "items": items})
        if plural == "virtualservices" and request.query["resourceVersion"] == "300":
            return await self._stream(request, [{"type": "MODIFIED", "object": _vs("v2", "301")}], hang=True)
        return await self._stream(request, [], hang=True)


def _vs(subset: str, rv: str) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": rv, "generation": 2,
                         "uid": "7c0f3a2e-9b1d-4e5f-8a6b-1c2d3e4f5a6b",
                         "creationTimestamp": "2026-11-28T09:00:00Z",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                            "apiVersion": "networking.istio.io/v1", "fieldsType": "FieldsV1",
                                            "fieldsV1": {"f:spec": {".": {}, "f:hosts": {}}}}]},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews",
                                                                                "subset": subset}}]}]}}


def test_config_from_recorded_custom_resources() -> None:
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
          "metadata": {"name": "reviews", "namespace": "bookinfo", "resourceVersion": "9"},
          "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
          "status": {"validationMessages": []}}
    bad = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"name": "strict", "namespace": "bookinfo"}, "spec": {"mtls": {"mode": "STRICTER"}}}
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    wrong_group = {"apiVersion": "example.com/v1", "kind": "VirtualService", "metadata": {"name": "g"},
                   "spec": {"anything": "x"}}
    res = config_from_objects([{"kind": "List", "apiVersion": "v1", "items": [_vs("v1", "1"), dr]},
                               bad, other, wrong_group])
    assert sorted(r.key for r in res.resources) == ["DestinationRule/bookinfo/reviews",
                                                    "VirtualService/default/reviews"]
    assert len(res.errors) == 1 and not res.ok
    assert "kubernetes:PeerAuthentication/bookinfo/strict" in str(res.errors[0])


async def test_watcher_follows_istio_config() -> None:
    api = ReplayApiServer()
    url = await api.start()
    configs: list[list[str]] = []
    registries: list[Registry] = []
    done = asyncio.Event()

    async def on_config(res: Any) -> None:
        assert res.ok, [str(e) for e in res.errors]
        (vs,) = [r for r in res.resources if r.kind == "VirtualService"]
        configs.append([d.destination.subset for h in vs.spec.http for d in h.route])
        if configs[-1] == ["v2"] and registries:
            done.set()

    async def on_registry(reg: Registry) -> None:
        registries.append(reg)
        if configs and configs[-1] == ["v2"]:
            done.set()

    watcher = KubeWatcher(base_url=url, token="t", on_registry=on_registry, on_config=on_config,
                          retry_delay=0.05)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()
    # config is published once every custom resource is listed (or known missing), without
    # waiting for the registry's kinds (pods fail once); the registry follows
    assert configs[-1] == ["v2"] and all(c in (["v1"], ["v2"]) for c in configs)
    assert registries, "the registry is published too once Services, slices and Pods are listed"
    paths = {p for p, _, _ in api.requests}
    assert "/apis/security.istio.io/v1/authorizationpolicies" in paths
    assert "/apis/networking.istio.io/v1/virtualservices" in paths


async def test_watcher_against_replayed_api() -> None:
    api = ReplayApiServer()
    url = await api.start()
    published: list[Registry] = []
    done = asyncio.Event()

    async def on_registry(reg: Registry) -> None:
        published.append(reg)
        hosts = {s.short_name for s in reg.services}
        if hosts == {"reviews", "ratings", "details"} and len(reg.instances) == 2:
            done.set()

    watcher = KubeWatcher(base_url=url, token="t0ken", on_registry=on_registry, retry_delay=0.05)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()
    # nothing is published before every kind was listed once (pods failed first)
    assert all(any(i.labels for i in r.instances) for r in published)
    final = published[-1]
    inst = {i.address: i for i in final.instances}
    assert inst["10.0.0.1"].labels == {"app": "reviews", "version": "v1"}
    assert inst["10.0.0.1"].service_account == "bookinfo-reviews"
    assert inst["10.0.0.2"].services == ("reviews.default.svc.cluster.local",)
    watch_rvs = [q["resourceVersion"] for p, q, _ in api.requests if p == "/api/v1/services" and "watch" in q]
    assert watch_rvs[:3] == ["100", "110", "200"]  # bookmark and event advance it; 410 -> relist at 200
    assert all(auth == "Bearer t0ken" for _, _, auth in api.requests)
    assert watcher.errors >= 1 and watcher.relists >= 1 and api.pod_lists == 2

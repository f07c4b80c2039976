"""Transparent capture on a cluster: Service ClusterIPs -> ``Service.addresses`` and injected
pods -> interception mode REDIRECT, from recorded API objects through the list/watch stand-in
to the snapshot a real control plane serves (its 15001 capture table holds the ClusterIP)."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import aiohttp
import pytest

from diktyo.control.ingest.kubernetes import (
    CORE_RESOURCES,
    KubeWatcher,
    ProxySync,
    interception_mode,
    service_from_object,
)
from diktyo.control.inject.pod import inject_pod
from diktyo.control.server import ControlPlane
from diktyo.testing.kube_api import FakeApiServer
from diktyo.testing.wait import eventually

NS = "shop"


def _svc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS}, "spec": spec}


REVIEWS = _svc("reviews", {"type": "ClusterIP", "clusterIP": "10.96.44.3",
                           "clusterIPs": ["10.96.44.3", "fd00:10:96::2c03"],
                           "ipFamilies": ["IPv4", "IPv6"], "selector": {"app": "reviews"},
                           "ports": [{"name": "http", "port": 9080, "protocol": "TCP",
                                      "targetPort": 9080}]})
DB = _svc("db", {"type": "ClusterIP", "clusterIP": "10.96.7.7", "clusterIPs": ["10.96.7.7"],
                 "ports": [{"name": "tcp-postgres", "port": 5432, "protocol": "TCP",
                            "targetPort": 5432}]})
HEADLESS = _svc("ratings", {"clusterIP": "None", "clusterIPs": ["None"],
                            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]})
EXTERNAL = _svc("legacy", {"type": "ExternalName", "externalName": "db.corp.example",
                           "ports": [{"name": "tcp", "port": 5432, "protocol": "TCP"}]})


def _slice(svc: str, ip: str, pod: str, port: int, name: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{svc}-abcde", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}}],
            "ports": [{"name": name, "port": port, "protocol": "TCP"}]}


def _injected(name: str, app: str, ip: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod as the API server returns it after the webhook injected it (diktyo's injector)."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS, "labels": {"app": app},
                        "annotations": dict(annotations or {})},
           "spec": {"serviceAccountName": app,
                    "containers": [{"name": app, "image": f"{app}:1",
                                    "ports": [{"name": "http", "containerPort": 9080}]}]}}
    out = inject_pod(pod)
    out["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    return {k: v for k, v in out.items() if k not in ("apiVersion", "kind")}


REVIEWS_POD = _injected("reviews-1", "reviews", "10.244.1.7")
OPTED_OUT_POD = _injected("batch-1", "batch", "10.244.1.8",
                          {"sidecar.istio.io/interceptionMode": "NONE"})


def test_service_addresses_from_cluster_ips() -> None:
    reviews = service_from_object(REVIEWS)
    assert reviews is not None and reviews.addresses == ("10.96.44.3", "fd00:10:96::2c03")
    only_ip = service_from_object(_svc("a", {"clusterIP": "10.96.0.9", "ports": []}))
    assert only_ip is not None and only_ip.addresses == ("10.96.0.9",)  # before clusterIPs existed
    for svc in (HEADLESS, EXTERNAL, _svc("pending", {"clusterIP": "", "ports": []})):
        got = service_from_object(svc)
        assert got is not None and got.addresses == (), svc  # no VIP to capture


def test_interception_mode_of_pods(caplog: pytest.LogCaptureFixture) -> None:
    assert interception_mode(REVIEWS_POD) == "REDIRECT"  # injected with diktyo-init
    assert interception_mode(OPTED_OUT_POD) == "NONE"  # injector added no init container
    no_init = copy.deepcopy(REVIEWS_POD)
    no_init["spec"]["initContainers"] = []
    assert interception_mode(no_init) == "NONE"  # nothing installs capture rules
    istio = copy.deepcopy(no_init)
    istio["spec"]["initContainers"] = [{"name": "istio-init"}]
    assert interception_mode(istio) == "REDIRECT"  # injected by Istio's own injector
    disabled = copy.deepcopy(REVIEWS_POD)  # init container present, annotation says NONE
    disabled["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "none"
    assert interception_mode(disabled) == "NONE"
    tproxy = copy.deepcopy(istio)
    tproxy["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = "TPROXY"
    with caplog.at_level(logging.WARNING):
        assert interception_mode(tproxy) == "NONE"
    assert "interceptionMode=TPROXY is not supported" in caplog.text


async def test_snapshot_from_api_objects_has_the_cluster_ip_capture_table() -> None:
    api = FakeApiServer()
    for res in CORE_RESOURCES:
        api.add_resource(res.path, res.api_version, res.kind)
    await api.start()
    for svc in (REVIEWS, DB, HEADLESS, EXTERNAL):
        await api.put("/api/v1/services", copy.deepcopy(svc))
    await api.put("/apis/discovery.k8s.io/v1/endpointslices",
                  _slice("reviews", "10.244.1.7", "reviews-1", 9080, "http"))
    for pod in (REVIEWS_POD, OPTED_OUT_POD):
        await api.put("/api/v1/pods", copy.deepcopy(pod))
    cp = ControlPlane(observability=False, debounce=0.01)
    url = await cp.start()
    watcher = KubeWatcher(base_url=api.url, token="t0ken", retry_delay=0.05,
                          on_registry=cp.registry_source("kubernetes"), on_proxies=ProxySync(cp))
    task = asyncio.create_task(watcher.run())
    try:
        async with aiohttp.ClientSession(headers=cp.admin_headers()) as s:
            async def snapshot(node: str) -> dict[str, Any] | None:
                async with s.get(f"{url}/v1/proxies/{node}/snapshot") as r:
                    return await r.json() if r.status == 200 else None

            async def reviews_with_db() -> dict[str, Any] | None:
                snap = await snapshot("reviews-1.shop")
                cap = (snap or {}).get("capture") or {}
                return snap if any(e["port"] == 5432 for e in cap.get("services", [])) else None

            snap = await eventually(reviews_with_db, timeout=20)
            assert snap["node"]["interception_mode"] == "REDIRECT"
            cap = snap["capture"]
            table = {(e["address"], e["port"]): (e["host"], e["protocol"], e["cluster"])
                     for e in cap["services"]}
            assert table[("10.96.44.3", 9080)] == (
                "reviews.shop.svc.cluster.local", "http", "outbound|9080||reviews.shop.svc.cluster.local")
            assert table[("fd00:10:96::2c03", 9080)][0] == "reviews.shop.svc.cluster.local"
            assert table[("10.96.7.7", 5432)][1] == "tcp"
            assert not any(host.startswith(("ratings.", "legacy.")) for host, _, _ in table.values())
            ports = {(ln["port"], ln["direction"]) for ln in snap["listeners"]}
            assert {(15001, "capture_outbound"), (15006, "capture_inbound")} <= ports
            assert [(i["port"], i["service_port"]) for i in cap["inbound"]] == [(9080, 9080)]

            opted_out = await eventually(lambda: snapshot("batch-1.shop"), timeout=20)
            assert opted_out["node"].get("interception_mode", "NONE") == "NONE"  # default: omitted
            assert opted_out.get("capture") is None
            assert not any(ln["port"] in (15001, 15006) for ln in opted_out.get("listeners", []))

            # a Service's ClusterIP changes (deleted and re-created): the table follows the watch
            await api.delete("/api/v1/services", NS, "db")
            await api.put("/api/v1/services", _svc("db", {**DB["spec"], "clusterIP": "10.96.8.8",
                                                          "clusterIPs": ["10.96.8.8"]}))

            async def moved() -> bool:
                snap = await snapshot("reviews-1.shop") or {}
                addrs = {e["address"] for e in (snap.get("capture") or {}).get("services", [])}
                return "10.96.8.8" in addrs and "10.96.7.7" not in addrs

            await eventually(moved, timeout=20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cp.stop()
        await api.close()

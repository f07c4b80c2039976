"""Translate for a transparent-capture proxy (Node.interception_mode REDIRECT): the 15001 /
15006 listeners and ``Snapshot.capture`` from Services' VIPs, port naming, VirtualService
``tcp:`` rules, outboundTrafficPolicy (mesh and Sidecar)."""

from __future__ import annotations

import msgspec

from diktyo.api import load_text
from diktyo.control.model import InboundPort, ProxyNode, PushContext, Registry, ServicePort
from diktyo.control.translate import translate
from diktyo.control.translate.cache import PushTranslator
from diktyo.control.translate.capture import capture_protocol
from diktyo.snapshot.codec import decode, encode
from diktyo.snapshot.model import MeshConfig, Node

CONFIG = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.209.128.10
  ports:
  - {name: http-web, port: 8080}
  - {name: grpc-api, port: 7000, appProtocol: tcp}
  - {name: stuff, port: 7100}
---
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: default}
spec:
  clusterIP: 10.209.128.11
  ports:
  - {name: tcp-redis, port: 6379}
---
apiVersion: v1
kind: Service
metadata: {name: redis-v2, namespace: default}
spec:
  clusterIP: 10.209.128.12
  ports:
  - {name: tcp-redis, port: 6379}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dbs, namespace: default}
spec:
  hosts: [dbs.internal]
  addresses: [10.50.0.0/16]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  endpoints: [{address: 10.50.0.5}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: redis, namespace: default}
spec:
  hosts: [redis]
  tcp:
  - match: [{port: 6379, sourceLabels: {app: other}}]
    route: [{destination: {host: web, port: {number: 7000}}}]
  - match: [{port: 6379, destinationSubnets: [10.209.128.11/32]}]
    route:
    - {destination: {host: redis}, weight: 80}
    - {destination: {host: redis-v2}, weight: 20}
"""

SIDECAR = """\
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""


def _proxy(mode: str = "REDIRECT") -> ProxyNode:
    node = Node(id="client-1.default", workload="client", labels={"app": "client"},
                interception_mode=mode, services=("web.default.svc.cluster.local",))  # type: ignore[arg-type]  # fmt: skip
    return ProxyNode(node=node, inbound=(InboundPort(service_port=8080, listen_port=0,
                                                     app_port=8080),))  # fmt: skip


def _push(text: str, mesh: MeshConfig | None = None) -> PushContext:
    result = load_text(text, "capture.yaml")
    assert result.errors == []
    return PushContext(resources=tuple(result.resources), registry=Registry(),
                       mesh=mesh or MeshConfig(), version="7")  # fmt: skip


def test_capture_listeners_services_and_inbound() -> None:
    snap = translate(_proxy(), _push(CONFIG))
    names = {lst.name: lst for lst in snap.listeners}
    assert names["virtualOutbound"].port == 15001
    assert names["virtualOutbound"].direction == "capture_outbound"
    assert names["virtualInbound"].port == 15006
    assert not any(n.startswith("inbound|") for n in names)  # 15006 replaces per-port listeners
    cap = snap.capture
    assert cap is not None and cap.outbound_traffic_policy == "ALLOW_ANY"
    assert cap.protocol_detection_timeout == 0.0
    by = {(s.address, s.port): s for s in cap.services}
    assert by[("10.209.128.10", 8080)].protocol == "http"
    assert by[("10.209.128.10", 7000)].protocol == "tcp"  # appProtocol tcp beats grpc-
    assert by[("10.209.128.10", 7100)].protocol == "auto"  # unnamed meaning: sniffed
    assert by[("10.50.0.0/16", 5432)].host == "dbs.internal"
    redis = by[("10.209.128.11", 6379)]
    assert (
        redis.protocol == "tcp"
        and redis.cluster == "outbound|6379||redis.default.svc.cluster.local"
    )
    # the sourceLabels rule is not for app=client; the subnet rule is, with its weights
    (route,) = redis.tcp_routes
    assert [m.destination_subnets for m in route.matches] == [("10.209.128.11/32",)]
    assert [(c.cluster, c.weight) for c in route.clusters] == [
        ("outbound|6379||redis.default.svc.cluster.local", 80),
        ("outbound|6379||redis-v2.default.svc.cluster.local", 20),
    ]
    clusters = {c.name for c in snap.clusters}
    assert "outbound|6379||redis-v2.default.svc.cluster.local" in clusters
    assert "outbound|5432||dbs.internal" in clusters
    (ib,) = cap.inbound
    assert (ib.port, ib.service_port, ib.protocol, ib.cluster) == (
        8080,
        8080,
        "http",
        "inbound|8080||",
    )
    assert "inbound|8080||" in clusters
    assert decode(encode(snap)) == snap  # passes the snapshot's own validation


def test_other_source_labels_get_the_other_rule() -> None:
    proxy = _proxy()
    proxy = ProxyNode(node=msgspec.structs.replace(proxy.node, labels={"app": "other"}),
                      inbound=proxy.inbound)  # fmt: skip
    cap = translate(proxy, _push(CONFIG)).capture
    assert cap is not None
    redis = next(s for s in cap.services if s.port == 6379 and s.address == "10.209.128.11")
    assert redis.tcp_routes[0].matches == ()  # matches every connection to 6379
    assert redis.tcp_routes[0].clusters[0].cluster == "outbound|7000||web.default.svc.cluster.local"


def test_outbound_traffic_policy_mesh_then_sidecar() -> None:
    cap = translate(
        _proxy(), _push(CONFIG, MeshConfig(outbound_traffic_policy="REGISTRY_ONLY"))
    ).capture
    assert cap is not None and cap.outbound_traffic_policy == "REGISTRY_ONLY"
    cap = translate(_proxy(), _push(CONFIG + SIDECAR)).capture
    assert cap is not None and cap.outbound_traffic_policy == "REGISTRY_ONLY"


def test_no_capture_without_redirect_and_cache_agrees() -> None:
    push = _push(CONFIG)
    plain = translate(_proxy("NONE"), push)
    assert plain.capture is None
    assert any(lst.name == "inbound|8080" for lst in plain.listeners)
    pt = PushTranslator()
    for mode in ("REDIRECT", "NONE"):
        built = pt.build(_proxy(mode), push)
        assert built.snapshot == translate(_proxy(mode), push)
        assert b"".join(built.parts()) == encode(built.snapshot)


def test_capture_protocol_follows_istio_port_naming() -> None:
    assert capture_protocol(ServicePort(80, "http2-x", "HTTP2")) == "http2"
    assert capture_protocol(ServicePort(80, "redis", "TCP")) == "tcp"
    assert capture_protocol(ServicePort(80, "", "TCP")) == "auto"
    assert capture_protocol(ServicePort(80, "https", "HTTPS")) == "tcp"
    assert capture_protocol(ServicePort(80, "web", "HTTP")) == "http"  # appProtocol http

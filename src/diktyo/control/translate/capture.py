"""Transparent capture: the 15001 / 15006 listeners and ``Snapshot.capture`` for a proxy whose
``Node.interception_mode`` is REDIRECT (Istio's virtualOutbound / virtualInbound listeners).

- one ``CaptureService`` per (service address, port) of every registry service this proxy
  sees (Sidecar ``egress`` scope) that has addresses (a ClusterIP / VIP, ServiceEntry
  ``addresses`` including CIDRs);
- the protocol of a port as Istio selects it: the port name prefix (``http``, ``http2``,
  ``grpc``, ``tcp``, ``tls``, ``mongo``, ``redis``, ``mysql``, ...) or ``appProtocol``;
  a port whose name says nothing is ``auto`` (sniffed by the sidecar);
- VirtualService ``tcp:`` rules of the service (``tcp_routes_for``): ``sourceLabels``,
  ``sourceNamespace`` and ``gateways`` decided here for this proxy, ``port`` and
  ``destinationSubnets`` left to the sidecar;
- ``outboundTrafficPolicy``: the Sidecar resource's if it sets one, else the mesh's;
- one ``CaptureInbound`` per inbound port, keyed by the workload port the peer dials.
"""

from __future__ import annotations

from typing import Any, Literal

from diktyo.control.model import ProxyNode, Service, ServicePort
from diktyo.control.translate.hosts import ConfigIndex, resolve_host, selector_matches
from diktyo.control.translate.scope import Visible, select_sidecar
from diktyo.snapshot.model import (
    Capture,
    CaptureInbound,
    CaptureService,
    Listener,
    MeshConfig,
    RouteSource,
    TcpRoute,
    TcpRouteMatch,
    WeightedCluster,
)

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006

# Istio's protocol names (port name prefix / appProtocol) -> capture protocol
_NAMED = {
    "http": "http", "http2": "http2", "grpc": "grpc", "grpc-web": "http", "https": "tcp",
    "tls": "tcp", "tcp": "tcp", "mongo": "tcp", "mysql": "tcp", "redis": "tcp",
}  # fmt: skip

Needed = set[tuple[str, int, str]]
Protocol = Literal["http", "http2", "grpc", "tcp", "auto"]
Policy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]


def capture_protocol(port: ServicePort) -> Protocol:
    """``http`` / ``http2`` / ``grpc`` / ``tcp`` as Istio selects it (``appProtocol``, then the
    port name prefix; the registry's ``protocol`` holds that choice), ``auto`` (sniff) for a
    port whose name says nothing. A registry ``TCP`` from ``appProtocol: tcp`` on an unnamed
    port cannot be told from an unnamed port, and is sniffed too (sniffing finds TCP)."""
    proto = (port.protocol or "").upper()
    if proto == "HTTP":
        return "http"
    if proto == "HTTP2":
        return "http2"
    if proto == "GRPC":
        return "grpc"
    if proto in ("TLS", "HTTPS", "MONGO", "MYSQL", "REDIS"):
        return "tcp"
    name = (port.name or "").lower()
    if name.split("-", 1)[0] in _NAMED:
        return "tcp"  # named tcp-*, redis-*, ..., or a known prefix overridden by appProtocol
    return "auto"  # unnamed / unrecognised name: Istio sniffs


def interception(proxy: ProxyNode) -> bool:
    return proxy.node.interception_mode == "REDIRECT" and proxy.node.mode == "sidecar"


def capture_listeners(proxy: ProxyNode) -> list[Listener]:
    return [
        Listener(name="virtualOutbound", direction="capture_outbound", address="0.0.0.0",
                 port=OUTBOUND_PORT),
        Listener(name="virtualInbound", direction="capture_inbound", address="0.0.0.0",
                 port=INBOUND_PORT),
    ]  # fmt: skip


def _l4_applies(m: Any, proxy: ProxyNode, vs_namespace: str) -> bool:
    node = proxy.node
    if m.gateways and "mesh" not in m.gateways:
        return False
    if m.source_labels and not selector_matches(m.source_labels, node.labels):
        return False
    return not (m.source_namespace and m.source_namespace != node.namespace)


def tcp_routes_for(
    idx: ConfigIndex, proxy: ProxyNode, host: str, port: int
) -> tuple[tuple[TcpRoute, ...], Needed]:
    """VirtualService ``tcp:`` rules for ``host:port`` as seen by ``proxy`` (first VS that has
    a rule for this port wins, as Istio merges by host), and the clusters they need."""
    services = idx.registry.services
    needed: Needed = set()
    for vs in idx.mesh_virtual_services(host):
        routes: list[TcpRoute] = []
        for i, rule in enumerate(vs.spec.tcp or ()):
            matches: list[TcpRouteMatch] = []
            applies = not rule.match
            for m in rule.match:
                if not _l4_applies(m, proxy, vs.namespace):
                    continue
                if m.port is not None and m.port != port:
                    continue
                applies = True
                if m.destination_subnets:
                    matches.append(TcpRouteMatch(destination_subnets=tuple(m.destination_subnets)))
                else:
                    matches = []  # this match holds for every connection to the port
                    break
            if not applies:
                continue
            clusters: list[WeightedCluster] = []
            for rd in rule.route:
                d = rd.destination
                dhost = resolve_host(d.host, vs.namespace, services)
                dport = d.port.number if d.port is not None and d.port.number else port
                subset = d.subset or ""
                name = f"outbound|{dport}|{subset}|{dhost}"
                needed.add((dhost, dport, subset))
                weight = (
                    rd.weight if rd.weight is not None else (100 if len(rule.route) == 1 else 0)
                )
                clusters.append(WeightedCluster(cluster=name, weight=weight, host=dhost,
                                                subset=subset, port=dport))  # fmt: skip
            if clusters:
                routes.append(TcpRoute(
                    matches=tuple(matches), clusters=tuple(clusters),
                    source=RouteSource(name=vs.name, namespace=vs.namespace, rule=i),
                ))  # fmt: skip
        if routes:
            return tuple(routes), needed
    return (), needed


def outbound_policy(idx: ConfigIndex, proxy: ProxyNode, mesh: MeshConfig) -> Policy:
    sc = select_sidecar(idx, proxy.node)
    otp = getattr(sc.spec, "outbound_traffic_policy", None) if sc is not None else None
    if otp is not None and otp.mode == "REGISTRY_ONLY":
        return "REGISTRY_ONLY"
    if otp is not None and otp.mode == "ALLOW_ANY":
        return "ALLOW_ANY"
    return mesh.outbound_traffic_policy


def build_capture(
    idx: ConfigIndex, proxy: ProxyNode, visible: Visible | None, mesh: MeshConfig
) -> tuple[Capture, Needed]:
    """``Snapshot.capture`` for ``proxy`` and the outbound clusters it refers to."""
    needed: Needed = set()
    services: list[CaptureService] = []
    for svc in idx.registry.services:
        if not svc.addresses:
            continue
        for p in svc.ports:
            if p.protocol.upper() == "UDP":
                continue
            if visible is not None and not visible(svc, p.number):
                continue
            services += _service_entries(idx, proxy, svc, p, needed)
    inbound: list[CaptureInbound] = []
    own = [s for s in idx.registry.services if s.hostname in proxy.node.services]
    for ib in proxy.inbound:
        proto: Protocol = "auto"
        for svc in own:
            for p in svc.ports:
                if p.number == ib.service_port:
                    proto = capture_protocol(p)
        inbound.append(CaptureInbound(
            port=ib.app_port or ib.service_port, service_port=ib.service_port,
            protocol=proto, cluster=f"inbound|{ib.service_port}||",
        ))  # fmt: skip
    cap = Capture(
        outbound_port=OUTBOUND_PORT,
        inbound_port=INBOUND_PORT,
        outbound_traffic_policy=outbound_policy(idx, proxy, mesh),
        protocol_detection_timeout=mesh.protocol_detection_timeout,
        services=tuple(services),
        inbound=tuple(inbound),
    )
    return cap, needed


def _service_entries(
    idx: ConfigIndex, proxy: ProxyNode, svc: Service, p: ServicePort, needed: Needed
) -> list[CaptureService]:
    proto = capture_protocol(p)
    cluster = f"outbound|{p.number}||{svc.hostname}"
    needed.add((svc.hostname, p.number, ""))
    routes: tuple[TcpRoute, ...] = ()
    if proto in ("tcp", "auto"):
        routes, more = tcp_routes_for(idx, proxy, svc.hostname, p.number)
        needed |= more
    return [
        CaptureService(address=addr, port=p.number, host=svc.hostname,
                       protocol=proto, cluster=cluster, tcp_routes=routes)
        for addr in svc.addresses
    ]  # fmt: skip

"""Listeners: the app's outbound HTTP proxy port, inbound ports, per-upstream local ports, gateways."""

from __future__ import annotations

from typing import Any

from diktyo.control.model import ProxyNode
from diktyo.control.translate.hosts import (
    ConfigIndex,
    is_http,
    protocol_of,
    resolve_host,
    upstream_protocol,
)
from diktyo.snapshot.model import Cluster, Endpoint, Listener, cluster_name


def outbound_listeners(proxy: ProxyNode) -> list[Listener]:
    """The ``outbound`` listener (when a port is given, or in standalone mode) and one listener per
    ``local_ports`` entry: an HTTP listener with ``default_host`` for HTTP ports, TCP otherwise."""
    out: list[Listener] = []
    if proxy.outbound_port or proxy.node.mode == "standalone":
        out.append(
            Listener(
                name="outbound",
                direction="outbound",
                address=proxy.address,
                port=proxy.outbound_port,
                route_table="outbound",
            )
        )
    return out


def local_port_listeners(
    proxy: ProxyNode, idx: ConfigIndex
) -> tuple[list[Listener], list[tuple[str, int, str]]]:
    """Listeners for ``proxy.local_ports`` and the (host, port, subset) clusters TCP ones need
    (the service's own and those of its VirtualService ``tcp:`` routes)."""
    from diktyo.control.translate.capture import tcp_routes_for

    out: list[Listener] = []
    tcp: list[tuple[str, int, str]] = []
    for key, listen_port in sorted(proxy.local_ports.items()):
        host, _, port_s = key.rpartition(":")
        if not host or not port_s.isdigit():
            host, port_s = key, "80"
        port = int(port_s)
        host = resolve_host(host, proxy.node.namespace, idx.registry.services)
        svc = idx.service(host)
        proto = "http"
        if svc is not None:
            for p in svc.ports:
                if p.number == port:
                    proto = protocol_of(p.name, p.protocol)
        if is_http(proto):
            out.append(
                Listener(
                    name=f"outbound|{key}",
                    direction="outbound",
                    address=proxy.address,
                    port=listen_port,
                    route_table="outbound",
                    default_host=key,
                    service_port=port,
                )
            )
        else:
            tcp.append((host, port, ""))
            routes, needed = tcp_routes_for(idx, proxy, host, port)
            tcp += sorted(needed)
            out.append(
                Listener(
                    name=f"outbound|{key}",
                    direction="tcp",
                    address=proxy.address,
                    port=listen_port,
                    cluster=cluster_name(port, "", host),
                    service_port=port,
                    tcp_routes=routes,
                )
            )
    return out, tcp


def inbound(proxy: ProxyNode, idx: ConfigIndex) -> tuple[list[Listener], list[Cluster]]:
    """One listener and one ``inbound|PORT||`` cluster (to the app on 127.0.0.1) per inbound port."""
    listeners: list[Listener] = []
    clusters: list[Cluster] = []
    own = [s for s in idx.registry.services if s.hostname in proxy.node.services]
    for ib in proxy.inbound:
        proto = "http"
        for svc in own:
            for p in svc.ports:
                if p.number == ib.service_port:
                    proto = protocol_of(p.name, p.protocol)
        name = f"inbound|{ib.service_port}||"
        tcp = not is_http(proto)
        listeners.append(
            Listener(
                name=f"inbound|{ib.service_port}",
                direction="tcp" if tcp else "inbound",
                address=proxy.address,
                port=ib.listen_port,
                cluster=name,
                service_port=ib.service_port,
            )
        )
        up = upstream_protocol(proto)
        extra: dict[str, Any] = {"upstream_protocol": up} if up == "HTTP/2" else {}
        clusters.append(
            Cluster(
                **extra,
                name=name,
                port=ib.service_port,
                direction="inbound",
                endpoints=(
                    Endpoint(
                        address="127.0.0.1",
                        port=ib.app_port,
                        workload=proxy.node.workload,
                        namespace=proxy.node.namespace,
                    ),
                ),
                protocol=proto,  # type: ignore[arg-type]
            )
        )
    return listeners, clusters


def gateway_listeners(proxy: ProxyNode, ports: list[int]) -> list[Listener]:
    return [
        Listener(
            name=f"gateway-{port}",
            direction="gateway",
            address=proxy.address,
            port=proxy.gateway_ports.get(port, 0),
            route_table=f"gateway-{port}",
            service_port=port,
        )
        for port in sorted(ports)
    ]

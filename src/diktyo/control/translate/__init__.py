"""Translate: the pure function ``translate(proxy, push) -> Snapshot`` (Istio's config generator).

``listeners.py``, ``routes.py`` and ``clusters.py`` each build what they are named after;
``hosts.py`` resolves names and indexes config; ``registry.py`` turns ServiceEntries into
registry services and instances.
"""

from __future__ import annotations

from typing import Any

from diktyo.control.model import ProxyNode, PushContext
from diktyo.control.translate.capture import build_capture, capture_listeners, interception
from diktyo.control.translate.clusters import build_cluster, build_outbound_clusters
from diktyo.control.translate.hosts import ConfigIndex
from diktyo.control.translate.listeners import (
    gateway_listeners,
    inbound,
    local_port_listeners,
    outbound_listeners,
)
from diktyo.control.translate.registry import merge_registries, registry_from_service_entries
from diktyo.control.translate.routes import (
    RouteContext,
    build_gateway_table,
    build_outbound_table,
    gateway_servers,
)
from diktyo.control.translate.scope import egress_scope
from diktyo.control.translate.telemetry import build_telemetry
from diktyo.security.translate import SECURITY_KINDS, build_security
from diktyo.snapshot.model import Cluster, Snapshot

__all__ = ["merge_registries", "registry_from_service_entries", "translate"]


def translate(proxy: ProxyNode, push: PushContext) -> Snapshot:
    """Build the snapshot for ``proxy`` from ``push`` (pure: same input, same output).

    ServiceEntries among ``push.resources`` are added to ``push.registry`` (hosts the registry
    already has win). Every route target gets a cluster; a target whose service or subset is
    unknown gets an empty cluster (requests to it fail with 503, as in Istio). The security
    part (PeerAuthentication, AuthorizationPolicy, RequestAuthentication selecting this node)
    comes from ``diktyo.security.translate.build_security``.
    """
    idx = ConfigIndex.build(push.resources, push.registry)
    trust_domain = push.mesh.trust_domain or proxy.node.trust_domain
    visible = egress_scope(idx, proxy.node)
    ctx = RouteContext(idx=idx, proxy=proxy, visible=visible)

    listeners = outbound_listeners(proxy)
    local, tcp_targets = local_port_listeners(proxy, idx)
    listeners += local
    tables = [build_outbound_table(ctx)]
    if proxy.node.mode == "gateway":
        servers = gateway_servers(ctx)
        listeners += gateway_listeners(proxy, list(servers))
        for port in sorted(servers):
            tables.append(build_gateway_table(ctx, port, servers[port]))
    in_listeners, in_clusters = inbound(proxy, idx)
    extra: dict[str, Any] = {}
    if interception(proxy):  # transparent capture: 15001 / 15006 instead of per-port inbound
        listeners += capture_listeners(proxy)
        extra["capture"], cap_needed = build_capture(idx, proxy, visible, push.mesh)
        ctx.needed |= cap_needed
    else:
        listeners += in_listeners

    clusters: dict[str, Cluster] = build_outbound_clusters(idx, proxy, trust_domain, visible)
    for host, port, subset in tcp_targets:
        ctx.needed.add((host, port, subset))
    for host, port, subset in sorted(ctx.needed):
        name = f"outbound|{port}|{subset}|{host}"
        if name not in clusters:
            clusters[name] = build_cluster(
                idx, proxy, idx.service(host), host, port, subset, trust_domain
            )
    all_clusters = list(clusters.values()) + in_clusters
    security_resources = [r for r in push.resources if getattr(r, "kind", "") in SECURITY_KINDS]
    security = build_security(proxy.node, security_resources) if security_resources else None
    if security is not None:
        extra["security"] = security
    telemetry = build_telemetry(push.resources, proxy.node, push.mesh)
    return Snapshot(
        version=push.version,
        node=proxy.node,
        listeners=tuple(listeners),
        route_tables=tuple(tables),
        clusters=tuple(all_clusters),
        mesh=push.mesh,
        telemetry=telemetry,
        **extra,
    )

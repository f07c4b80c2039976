"""Host names: resolving short names to FQDNs, wildcard matching, and the index of config by kind."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from diktyo.control.model import Registry, Service, WorkloadInstance
from diktyo.control.translate.hostnames import (
    DOMAIN_SUFFIX,
    host_matches,
    resolve_host,
    split_cluster_host,
)
from diktyo.control.translate.registry import merge_registries, registry_from_service_entries

# the host-name functions live in ``hostnames`` (no cycle with ``registry``); importable here too
__all__ = [
    "DOMAIN_SUFFIX",
    "ConfigIndex",
    "host_matches",
    "is_http",
    "protocol_of",
    "resolve_host",
    "selector_matches",
    "split_cluster_host",
]


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def protocol_of(name: str, protocol: str | None) -> str:
    """Snapshot protocol (http, http2, grpc, tcp) from an Istio port's protocol or name prefix."""
    proto = (protocol or "").upper()
    if not proto:
        prefix = (name or "").split("-", 1)[0].upper()
        proto = prefix if prefix in _PROTOCOLS else "HTTP"
    return _PROTOCOLS.get(proto, "tcp")


_PROTOCOLS = {
    "HTTP": "http",
    "HTTP2": "http2",
    "GRPC": "grpc",
    "GRPC-WEB": "http2",  # Istio: gRPC-Web ports are HTTP/2 upstream (protocol.IsHTTP2)
    "TCP": "tcp",
    "TLS": "tcp",
    "HTTPS": "tcp",
    "MONGO": "tcp",
    "REDIS": "tcp",
    "MYSQL": "tcp",
}


def upstream_protocol(protocol: str, h2_upgrade_policy: str | None = None) -> str:
    """Istio's upstream protocol: HTTP/2 for http2/grpc/grpc-web ports, and for http ports whose
    DestinationRule sets ``connectionPool.http.h2UpgradePolicy: UPGRADE``; else HTTP/1.1."""
    if protocol in ("http2", "grpc"):
        return "HTTP/2"
    if protocol == "http" and h2_upgrade_policy == "UPGRADE":
        return "HTTP/2"
    return "HTTP/1.1"


def is_http(protocol: str) -> bool:
    return protocol in ("http", "http2", "grpc")


@dataclass
class ConfigIndex:
    """The push context's resources grouped by kind, in input order, plus the merged registry."""

    virtual_services: list[Any] = field(default_factory=list)
    destination_rules: list[Any] = field(default_factory=list)
    gateways: list[Any] = field(default_factory=list)
    service_entries: list[Any] = field(default_factory=list)
    sidecars: list[Any] = field(default_factory=list)
    kube_services: list[Any] = field(default_factory=list)  # Kubernetes Services in the config
    workload_entries: list[Any] = field(default_factory=list)  # selected by ServiceEntries

    # VirtualServices without hosts, by (namespace, name): used only through a root's delegate
    delegates: dict[tuple[str, str], Any] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    _dr_cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _by_host: dict[str, Service] = field(default_factory=dict, repr=False)
    # resolved hosts, computed once per index
    _dr_exact: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    _dr_wild: list[tuple[str, Any]] = field(default_factory=list, repr=False)
    _vs_exact: dict[str, list[Any]] = field(default_factory=dict, repr=False)
    _vs_wild: list[tuple[str, Any]] = field(default_factory=list, repr=False)
    _instances: dict[str, list[WorkloadInstance]] = field(default_factory=dict, repr=False)
    # Gateway API routes bound to their parents (gateway_api.GatewayApiIndex), computed on first
    # use by gateway_api.index_of() from ``resources`` (this module does not import it: no cycle)
    gateway_api: Any = None
    resources: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, resources: Iterable[Any], registry: Registry) -> ConfigIndex:
        resources = list(resources)
        idx = cls(resources=resources)
        by_kind = {
            "VirtualService": idx.virtual_services,
            "DestinationRule": idx.destination_rules,
            "Gateway": idx.gateways,
            "ServiceEntry": idx.service_entries,
            "Sidecar": idx.sidecars,
            "Service": idx.kube_services,
            "WorkloadEntry": idx.workload_entries,
        }
        for res in resources:
            kind = str(getattr(res, "qualified_kind", None) or getattr(res, "kind", ""))
            bucket = by_kind.get(kind)
            if bucket is not None:
                bucket.append(res)
        idx.registry = merge_registries(
            registry,
            registry_from_service_entries(
                idx.service_entries + idx.kube_services + idx.workload_entries
            ),
        )
        services = idx.registry.services
        for svc in services:
            idx._by_host.setdefault(svc.hostname, svc)
        for inst in idx.registry.instances:
            for h in inst.services:
                idx._instances.setdefault(h, []).append(inst)
        for dr in idx.destination_rules:
            host = resolve_host(dr.spec.host, dr.namespace, services)
            if "*" in host:
                idx._dr_wild.append((host, dr))
            else:
                idx._dr_exact.setdefault(host, []).append(dr)
        for vs in idx.virtual_services:
            if not vs.spec.hosts:
                idx.delegates.setdefault((vs.namespace, vs.name), vs)
            if vs.spec.gateways and "mesh" not in vs.spec.gateways:
                continue
            seen: set[str] = set()
            for h in vs.spec.hosts:
                if h == "*":
                    continue  # Istio rejects '*' for mesh-bound VirtualServices (analyze says so)
                host = resolve_host(h, vs.namespace, services)
                if host in seen:
                    continue
                seen.add(host)
                if "*" in host:
                    idx._vs_wild.append((host, vs))
                else:
                    idx._vs_exact.setdefault(host, []).append(vs)
        return idx

    def instances_of(self, hostname: str) -> list[WorkloadInstance]:
        """Registry instances serving ``hostname``, in registry order."""
        return self._instances.get(hostname, [])

    def unbacked_mesh_hosts(self) -> list[tuple[str, list[Any]]]:
        """Exact mesh VirtualService hosts that no registry service has, with their VSs."""
        return [(h, vss) for h, vss in self._vs_exact.items() if h not in self._by_host]

    def mesh_virtual_services(self, hostname: str) -> list[Any]:
        """VirtualServices bound to the mesh whose hosts cover ``hostname``: exact hosts first
        (input order), then wildcard ones (input order)."""
        exact = self._vs_exact.get(hostname, [])
        wild: list[Any] = []
        for host, vs in self._vs_wild:
            if host_matches(host, hostname) and vs not in exact and vs not in wild:
                wild.append(vs)
        return exact + wild

    def service(self, hostname: str) -> Service | None:
        return self._by_host.get(hostname)

    def destination_rule(self, hostname: str, proxy_namespace: str) -> Any | None:
        """The DestinationRule for ``hostname``: exact host first, then the most specific wildcard.

        Several for the same host are merged as Istio does: the first (one in the proxy's
        namespace first, then input order) gives the traffic policy, later ones add subsets
        with new names."""
        key = (hostname, proxy_namespace)
        if key not in self._dr_cache:
            self._dr_cache[key] = self._find_destination_rule(hostname, proxy_namespace)
        return self._dr_cache[key]

    def _find_destination_rule(self, hostname: str, proxy_namespace: str) -> Any | None:
        exact = list(self._dr_exact.get(hostname, []))
        wild = [(len(host), dr) for host, dr in self._dr_wild if host_matches(host, hostname)]
        if exact:
            exact.sort(key=lambda d: d.namespace != proxy_namespace)
            return _merge_rules(exact)
        if wild:
            wild.sort(key=lambda t: -t[0])
            return wild[0][1]
        return None


def _merge_rules(rules: list[Any]) -> Any:
    first = rules[0]
    if len(rules) == 1:
        return first
    subsets = list(first.spec.subsets)
    names = {s.name for s in subsets}
    for dr in rules[1:]:
        for s in dr.spec.subsets:
            if s.name not in names:
                names.add(s.name)
                subsets.append(s)
    return dataclasses.replace(first, spec=first.spec.model_copy(update={"subsets": subsets}))

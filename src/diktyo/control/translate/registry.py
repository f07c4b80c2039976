"""Service registry from config: ServiceEntries (STATIC endpoints, or the WorkloadEntries a
``workloadSelector`` selects, become workload instances) and Kubernetes ``v1`` Services found
among the config files (services without instances)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diktyo.control.ingest.kubernetes import port_protocol, service_fqdn
from diktyo.control.model import Registry, Service, ServicePort, WorkloadInstance
from diktyo.control.translate.hostnames import resolve_host, split_cluster_host
from diktyo.control.translate.workload_entries import instances_selected_by, selected_instances


def registry_from_service_entries(resources: Iterable[Any]) -> Registry:
    """Build a Registry from the ServiceEntry resources among ``resources``.

    Each host becomes a Service (``short_name`` empty unless the host is an in-mesh
    ``name.ns.svc.cluster.local`` name); each ``endpoints`` entry of a STATIC (or unset
    resolution) entry becomes a WorkloadInstance without sidecar, its ``ports`` mapping the
    service port number to the endpoint port (by port name, else ``targetPort``, else the
    service port itself). A DNS entry without endpoints gets one instance per host, dialled
    by name (as Istio does).

    Kubernetes Services among ``resources`` are added too (see ``registry_from_kube_services``);
    for a hostname both declare, the Kubernetes Service wins, as in Istio's registry order.
    """
    return merge_registries(
        registry_from_kube_services(resources), _registry_from_entries(resources)
    )


def registry_from_kube_services(
    resources: Iterable[Any], domain: str = "cluster.local"
) -> Registry:
    """Kubernetes ``v1`` Service resources (loaded from config files) as registry services.

    As Istio does: the host is ``<name>.<namespace>.svc.<domain>``; each TCP port keeps its
    number, name and numeric ``targetPort``; its protocol is ``appProtocol`` if set, else the
    port name's prefix (``http``, ``http-web``, ``grpc-x``, ...), else TCP. UDP and SCTP ports
    are not proxied and are left out. Endpoints come from the platform, except the
    WorkloadEntries a Service's ``selector`` selects (``translate.workload_entries``).
    """
    services: list[Service] = []
    instances: list[WorkloadInstance] = []
    resources = list(resources)
    workload_entries = [r for r in resources if getattr(r, "kind", "") == "WorkloadEntry"]
    for res in resources:
        if getattr(res, "kind", "") != "Service" or getattr(res, "api_version", "v1") != "v1":
            continue
        spec = res.spec
        ports = tuple(
            ServicePort(
                number=p.port,
                name=p.name or "",
                protocol=port_protocol(p.name, p.app_protocol, p.protocol),
                target_port=p.target_port if isinstance(p.target_port, int) else None,
            )
            for p in spec.ports
            if p.protocol == "TCP"
        )
        services.append(
            Service(
                hostname=service_fqdn(res.name, res.namespace, domain),
                namespace=res.namespace,
                ports=ports,
                short_name=res.name,
                addresses=_cluster_ips(spec),
                resolution="DNS"
                if spec.type == "ExternalName"
                else ("NONE" if spec.cluster_ip == "None" else "STATIC"),
                source="kubernetes",
            )
        )
        if spec.selector and workload_entries:
            # Istio: a Service's selector also selects WorkloadEntries of its namespace
            instances += instances_selected_by(
                dict(spec.selector), res.namespace, [services[-1].hostname], ports,
                workload_entries,
            )  # fmt: skip
    return Registry(services=tuple(services), instances=tuple(instances))


def _cluster_ips(spec: Any) -> tuple[str, ...]:
    """A Service's ``clusterIP`` as its virtual address (none for headless / ExternalName)."""
    ip = getattr(spec, "cluster_ip", None)
    return (ip,) if ip not in (None, "", "None") else ()


def _registry_from_entries(resources: Iterable[Any]) -> Registry:
    services: list[Service] = []
    instances: list[WorkloadInstance] = []
    seen: set[str] = set()
    resources = list(resources)
    workload_entries = [r for r in resources if getattr(r, "kind", "") == "WorkloadEntry"]
    for res in resources:
        if getattr(res, "kind", "") != "ServiceEntry":
            continue
        se = res.spec
        ports = tuple(
            ServicePort(
                number=p.number,
                name=p.name,
                protocol=(p.protocol or _protocol_from_name(p.name)).upper(),
                target_port=p.target_port,
            )
            for p in se.ports
        )
        hostnames = [resolve_host(h, res.namespace) if "." not in h else h for h in se.hosts]
        external = se.location != "MESH_INTERNAL"
        for host in hostnames:
            if host in seen:
                continue
            seen.add(host)
            split = split_cluster_host(host)
            services.append(
                Service(
                    hostname=host,
                    namespace=res.namespace,
                    ports=ports,
                    short_name=split[0] if split else "",
                    mesh_external=external,
                    addresses=tuple(se.addresses),
                    resolution=se.resolution or "NONE",
                    source="ServiceEntry",
                )
            )
        if se.resolution not in (None, "STATIC", "DNS", "DNS_ROUND_ROBIN"):
            continue
        if se.workload_selector is not None:
            # endpoints are the WorkloadEntries it selects (translate.workload_entries)
            instances += selected_instances(res, hostnames, ports, workload_entries)
            continue
        if se.resolution in ("DNS", "DNS_ROUND_ROBIN") and not se.endpoints:
            # Istio: with DNS resolution and no endpoints, each host is its own endpoint
            for host in hostnames:
                if "*" in host:
                    continue
                instances.append(
                    WorkloadInstance(
                        name=f"{res.name}-{host}",
                        workload=res.name,
                        address=host,
                        ports={p.number: p.target_port or p.number for p in ports},
                        services=(host,),
                        namespace=res.namespace,
                        has_sidecar=False,
                    )
                )
            continue
        for i, ep in enumerate(se.endpoints):
            if not ep.address:
                continue
            port_map: dict[int, int] = {}
            for p in ports:
                port_map[p.number] = ep.ports.get(p.name, p.target_port or p.number)
            workload = ep.labels.get("app", res.name)
            version = ep.labels.get("version")
            instances.append(
                WorkloadInstance(
                    name=f"{res.name}-{i}",
                    workload=f"{workload}-{version}" if version else workload,
                    address=ep.address,
                    ports=port_map,
                    services=tuple(hostnames),
                    namespace=res.namespace,
                    labels=dict(ep.labels),
                    service_account=ep.service_account or "default",
                    has_sidecar=False,
                    weight=ep.weight or 1,
                )
            )
    return Registry(services=tuple(services), instances=tuple(instances))


def merge_registries(base: Registry, extra: Registry) -> Registry:
    """``base`` plus the services of ``extra`` whose hostnames ``base`` lacks (with their instances)."""
    known = {s.hostname for s in base.services}
    add = [s for s in extra.services if s.hostname not in known]
    if not add:
        return base
    added = {s.hostname for s in add}
    instances = [i for i in extra.instances if any(h in added for h in i.services)]
    return Registry(
        services=base.services + tuple(add), instances=base.instances + tuple(instances)
    )


def _protocol_from_name(name: str) -> str:
    prefix = (name or "").split("-", 1)[0].upper()
    return prefix if prefix in ("HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS") else "HTTP"

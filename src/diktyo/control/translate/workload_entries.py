"""WorkloadEntries as endpoints: a ServiceEntry's ``workloadSelector`` (or a Kubernetes
Service's ``selector``) picks them by labels.

Istio's semantics (``serviceregistry/serviceentry``), implemented here for diktyo's registry:

- a ServiceEntry with ``workloadSelector``, or a Kubernetes Service with a ``selector``, selects
  the WorkloadEntries **of its own namespace** whose labels match; an entry's labels are its ``spec.labels`` merged with its
  ``metadata.labels`` (metadata wins);
- the endpoint port of each service port is the entry's ``ports[<port name>]``, else the
  port's (numeric) ``targetPort``, else the port number itself;
- ``weight`` is the load-balancing weight (0 or unset: 1); ``locality`` (or the
  ``istio-locality`` label) and ``network`` become the topology labels Istio adds to every
  endpoint (``topology.kubernetes.io/region``/``zone``, ``topology.istio.io/subzone``,
  ``topology.istio.io/network``), so DestinationRule subsets can select on them;
- mTLS: the ``security.istio.io/tlsMode`` label decides; without it, a ``serviceAccount`` means
  the workload runs a sidecar (``istio``), and the endpoint's identity is
  ``spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccount>``;
- health: an entry annotated ``proxy.istio.io/health-checks-enabled: "true"`` is an endpoint
  only while its ``status.conditions`` has ``Healthy`` = ``True`` (a new entry is unhealthy
  until its first probe succeeds); other entries are always healthy;
- an address that is not an IP is used only by DNS ServiceEntries; ``unix://`` addresses are
  not dialled by diktyo's sidecar and are left out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from diktyo.control.model import ServicePort, WorkloadInstance

TLS_MODE_LABEL = "security.istio.io/tlsMode"
LOCALITY_LABEL = "istio-locality"
HEALTH_CHECKS_ANNOTATION = "proxy.istio.io/health-checks-enabled"
AUTO_REGISTRATION_GROUP = "istio.io/autoRegistrationGroup"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
NETWORK_LABEL = "topology.istio.io/network"


def entry_labels(entry: Any) -> dict[str, str]:
    """``spec.labels`` merged with ``metadata.labels`` (metadata wins), as Istio does."""
    return {**dict(entry.spec.labels), **dict(getattr(entry, "labels", {}) or {})}


def tls_mode(labels: dict[str, str], service_account: str | None) -> str:
    """``istio`` (mTLS to a sidecar) or ``disabled``: the label first, then the service account."""
    if TLS_MODE_LABEL in labels:
        return labels[TLS_MODE_LABEL]
    return "istio" if service_account else "disabled"


def is_healthy(entry: Any) -> bool:
    """Whether a WorkloadEntry is an endpoint now (see the module docstring)."""
    flag = str((getattr(entry, "annotations", {}) or {}).get(HEALTH_CHECKS_ANNOTATION, ""))
    if flag.lower() not in ("true", "1", "t"):
        return True
    for cond in (getattr(entry, "status", {}) or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Healthy":
            return str(cond.get("status")) == "True"
    return False


def locality_of(spec_locality: str | None, labels: dict[str, str]) -> str:
    if spec_locality:
        return spec_locality
    return labels.get(LOCALITY_LABEL, "").replace(".", "/")


def augment_labels(labels: dict[str, str], locality: str, network: str | None) -> dict[str, str]:
    """The topology labels Istio adds to an endpoint's labels (its ``AugmentLabels``)."""
    out = dict(labels)
    parts = list(locality.split("/")) if locality else []
    for key, value in zip((REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL), parts, strict=False):
        if value:
            out[key] = value
    if network:
        out[NETWORK_LABEL] = network
    return out


def workload_name(entry: Any) -> str:
    """The ``destination_workload`` of an entry: its group when auto-registered, else its name."""
    group = (getattr(entry, "annotations", {}) or {}).get(AUTO_REGISTRATION_GROUP)
    return str(group or entry.name)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def selected_instances(
    se: Any,
    hostnames: list[str],
    ports: tuple[ServicePort, ...],
    entries: Iterable[Any],
) -> list[WorkloadInstance]:
    """The endpoints of ServiceEntry ``se`` (a loaded resource with ``workloadSelector``)."""
    selector = dict(se.spec.workload_selector.labels) if se.spec.workload_selector else {}
    dns = se.spec.resolution in ("DNS", "DNS_ROUND_ROBIN")
    return instances_selected_by(selector, se.namespace, hostnames, ports, entries, dns=dns)


def instances_selected_by(
    selector: dict[str, str],
    namespace: str,
    hostnames: list[str],
    ports: tuple[ServicePort, ...],
    entries: Iterable[Any],
    *,
    dns: bool = False,
) -> list[WorkloadInstance]:
    """Endpoints of the WorkloadEntries of ``namespace`` that ``selector`` matches: a
    ServiceEntry's ``workloadSelector``, or a Kubernetes Service's ``selector`` (Istio's
    ``PILOT_ENABLE_K8S_SELECT_WORKLOAD_ENTRIES``, on by default)."""
    out: list[WorkloadInstance] = []
    for entry in entries:
        if entry.namespace != namespace:
            continue
        labels = entry_labels(entry)
        if not all(labels.get(k) == v for k, v in selector.items()):
            continue
        wle = entry.spec
        address = wle.address or ""
        if not address or address.startswith("unix://") or (not dns and not _is_ip(address)):
            continue
        port_map: dict[int, int] = {}
        for p in ports:
            given = wle.ports.get(p.name, 0)
            port_map[p.number] = given if given > 0 else (p.target_port or p.number)
        locality = locality_of(wle.locality, labels)
        out.append(
            WorkloadInstance(
                name=f"{entry.name}.{entry.namespace}",
                workload=workload_name(entry),
                address=address,
                ports=port_map,
                services=tuple(hostnames),
                namespace=entry.namespace,
                labels=augment_labels(labels, locality, wle.network),
                service_account=wle.service_account or "default",
                has_sidecar=tls_mode(labels, wle.service_account) == "istio",
                healthy=is_healthy(entry),
                weight=wle.weight or 1,
            )
        )
    return out

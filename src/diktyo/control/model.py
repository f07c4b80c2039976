"""The control plane's view of the world: the service registry and the push context.

``PushContext`` is immutable: ingest builds a new one on every change, translate reads it.
``translate(proxy: ProxyNode, push: PushContext) -> Snapshot`` lives in ``control/translate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diktyo.snapshot.model import MeshConfig, Node


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str = "http"  # Istio port naming: http-*, grpc-*, tcp-*, ...
    protocol: str = "HTTP"  # HTTP | HTTP2 | GRPC | TCP | TLS | HTTPS
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """A service in the registry (a Kubernetes Service, a ServiceEntry, or a mesh.yaml service)."""

    hostname: str  # FQDN, e.g. reviews.default.svc.cluster.local
    namespace: str = "default"
    ports: tuple[ServicePort, ...] = ()
    short_name: str = ""  # e.g. "reviews"; "" for external hosts
    mesh_external: bool = False
    resolution: str = "STATIC"  # STATIC | DNS | NONE
    source: str = "registry"  # registry | ServiceEntry
    # virtual IPs (ClusterIP, ServiceEntry ``addresses`` incl. CIDRs): what transparent capture
    # matches the original destination against
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkloadInstance:
    """One endpoint of one or more services.

    ``ports`` maps a service port number to the port to dial on ``address``: in local mode that
    is the workload sidecar's inbound listener port, for a ServiceEntry endpoint the app port.
    """

    name: str  # instance id, e.g. reviews-v2-1
    workload: str  # e.g. reviews-v2
    address: str
    ports: dict[int, int]
    services: tuple[str, ...]  # FQDNs this instance serves
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    has_sidecar: bool = False
    healthy: bool = True
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Registry:
    services: tuple[Service, ...] = ()
    instances: tuple[WorkloadInstance, ...] = ()


@dataclass(frozen=True, slots=True)
class InboundPort:
    service_port: int  # the port clients address (e.g. 9080)
    listen_port: int  # the sidecar's inbound listener (0 = pick)
    app_port: int  # where the app itself listens on 127.0.0.1


@dataclass(frozen=True, slots=True)
class ProxyNode:
    """The sidecar (or gateway) a snapshot is built for, with its allocated ports."""

    node: Node
    address: str = "127.0.0.1"
    outbound_port: int = 0  # HTTP proxy listener for the app (HTTP_PROXY)
    inbound: tuple[InboundPort, ...] = ()
    # per-upstream local ports: {"reviews.default.svc.cluster.local:9080": 15001}
    local_ports: dict[str, int] = field(default_factory=dict)
    gateway_ports: dict[int, int] = field(default_factory=dict)  # Gateway server port -> listen port


@dataclass(frozen=True, slots=True)
class PushContext:
    """Everything translate needs: user config resources, registry and mesh config."""

    resources: tuple[Any, ...]  # diktyo.api resources (validated)
    registry: Registry
    mesh: MeshConfig = field(default_factory=MeshConfig)
    version: str = "0"

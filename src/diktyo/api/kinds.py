"""The kind table: every apiVersion/kind the loader knows, and whether diktyo uses it.

One row per ``(group, kind)``. A row with a ``model`` is *used*: its ``spec`` is validated
with that model and it becomes a :class:`~diktyo.api.resource.Resource`. A row without a
model is *recognised but not implemented*: the document is checked (apiVersion, metadata)
and reported as ignored with ``reason`` (a warning: it changes nothing in diktyo's mesh,
though it would in Istio's). Anything not in the table is a problem for the loader: an
unknown kind of an ``*.istio.io`` or Gateway API group is an error (a typo, most likely);
any other Kubernetes object is ignored with an ``info`` note (``diktyo analyze -v``).

To implement a kind: write its spec model, set ``model=`` in its row (drop ``reason``).
To recognise a new kind: append a row.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from diktyo.api.gateway_api import GATEWAY_API_KINDS
from diktyo.api.kubernetes import KubeServiceSpec
from diktyo.api.networking import DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService
from diktyo.api.proxy_config import ProxyConfig
from diktyo.api.security import AuthorizationPolicy, PeerAuthentication, RequestAuthentication
from diktyo.api.telemetry import Telemetry
from diktyo.api.workloads import WorkloadEntry, WorkloadGroup

NETWORKING = "networking.istio.io"
SECURITY = "security.istio.io"
TELEMETRY = "telemetry.istio.io"
EXTENSIONS = "extensions.istio.io"
INSTALL = "install.istio.io"
GATEWAY_API = "gateway.networking.k8s.io"
CORE = ""  # Kubernetes core group: apiVersion "v1"

_NET_VERSIONS = ("v1", "v1beta1", "v1alpha3")
_SEC_VERSIONS = ("v1", "v1beta1")
_GW_NOT_YET = (
    "this Gateway API kind is not implemented; diktyo serves Gateway, HTTPRoute, GRPCRoute and "
    "ReferenceGrant"
)


@dataclass(frozen=True, slots=True)
class KindInfo:
    """One row of the kind table (see the module docstring)."""

    group: str  # API group; "" for the Kubernetes core group (apiVersion "v1")
    kind: str
    versions: tuple[str, ...]
    model: type[BaseModel] | None = None  # spec model of a kind diktyo uses
    reason: str = ""  # why a recognised kind is ignored (rows without a model)
    needs_name: bool = True  # metadata.name required (not for istioctl install's input)
    crd_checked: bool = False  # a used kind whose spec is also checked against Istio's CRD schema

    @property
    def used(self) -> bool:
        return self.model is not None

    def api_versions(self) -> list[str]:
        return [f"{self.group}/{v}" if self.group else v for v in self.versions]


KIND_TABLE: list[KindInfo] = [
    # ---- Istio kinds diktyo implements
    KindInfo(NETWORKING, "VirtualService", _NET_VERSIONS, VirtualService),
    KindInfo(NETWORKING, "DestinationRule", _NET_VERSIONS, DestinationRule),
    KindInfo(NETWORKING, "ServiceEntry", _NET_VERSIONS, ServiceEntry),
    KindInfo(NETWORKING, "Gateway", _NET_VERSIONS, Gateway),
    KindInfo(NETWORKING, "Sidecar", _NET_VERSIONS, Sidecar),
    # concurrency only (diktyo.platform, diktyo.control.inject); image and env have no effect
    KindInfo(NETWORKING, "ProxyConfig", ("v1beta1",), ProxyConfig),
    # VM workloads: the loader checks them against Istio's CRD schema, then the model (CEL rules)
    KindInfo(NETWORKING, "WorkloadEntry", _NET_VERSIONS, WorkloadEntry, crd_checked=True),
    KindInfo(NETWORKING, "WorkloadGroup", _NET_VERSIONS, WorkloadGroup, crd_checked=True),
    KindInfo(SECURITY, "PeerAuthentication", _SEC_VERSIONS, PeerAuthentication),
    KindInfo(SECURITY, "AuthorizationPolicy", _SEC_VERSIONS, AuthorizationPolicy),
    KindInfo(SECURITY, "RequestAuthentication", _SEC_VERSIONS, RequestAuthentication),
    # ---- Istio kinds diktyo recognises but does not implement (warned, ignored)
    KindInfo(
        NETWORKING,
        "EnvoyFilter",
        ("v1alpha3",),
        reason="it patches Envoy's own configuration, which diktyo's sidecar does not have",
    ),
    KindInfo(TELEMETRY, "Telemetry", ("v1", "v1alpha1"), Telemetry),
    KindInfo(
        EXTENSIONS,
        "WasmPlugin",
        ("v1alpha1",),
        reason="diktyo's sidecar does not run WebAssembly plugins",
    ),
    KindInfo(
        EXTENSIONS,
        "TrafficExtension",
        ("v1alpha1",),
        reason="diktyo's sidecar does not run traffic extensions",
    ),
    KindInfo(
        INSTALL,
        "IstioOperator",
        ("v1alpha1",),
        reason="it configures Istio's installation (istioctl install), not the mesh's traffic",
        needs_name=False,
    ),
    # ---- Gateway API (gateway.networking.k8s.io)
    KindInfo(GATEWAY_API, "GatewayClass", ("v1", "v1beta1"), reason=_GW_NOT_YET),
    KindInfo(GATEWAY_API, "TCPRoute", ("v1alpha2",), reason=_GW_NOT_YET),
    KindInfo(GATEWAY_API, "TLSRoute", ("v1alpha2", "v1alpha3"), reason=_GW_NOT_YET),
    KindInfo(GATEWAY_API, "UDPRoute", ("v1alpha2",), reason=_GW_NOT_YET),
    KindInfo(GATEWAY_API, "BackendTLSPolicy", ("v1", "v1alpha3"), reason=_GW_NOT_YET),
    # Gateway API kinds diktyo implements (models in api/gateway_api.py)
    *(
        KindInfo(GATEWAY_API, kind, versions, model)
        for kind, (versions, model) in GATEWAY_API_KINDS.items()
    ),
    # ---- Kubernetes kinds diktyo uses
    KindInfo(CORE, "Service", ("v1",), KubeServiceSpec),
]

# Groups whose every kind must be in the table: an unknown kind there is an error.
MESH_GROUPS = (NETWORKING, SECURITY, TELEMETRY, EXTENSIONS, INSTALL, GATEWAY_API)


def lookup(group: str, kind: str) -> KindInfo | None:
    """The table row of ``(group, kind)``; the last row wins (so appended rows override)."""
    found = None
    for row in KIND_TABLE:
        if row.group == group and row.kind == kind:
            found = row
    return found


def rows_of_kind(kind: str) -> list[KindInfo]:
    """Every row named ``kind`` (``Gateway`` exists in two groups)."""
    return [row for row in KIND_TABLE if row.kind == kind]


def is_mesh_group(group: str) -> bool:
    return group in MESH_GROUPS or group.endswith(".istio.io")


def istio_kinds() -> dict[str, tuple[str, tuple[str, ...], type[BaseModel]]]:
    """Implemented Istio kinds: ``kind -> (group, versions, spec model)`` (the old ``KINDS``)."""
    return {
        row.kind: (row.group, row.versions, row.model)
        for row in KIND_TABLE
        if row.model is not None and row.group.endswith("istio.io")
    }

"""Resource: one validated Istio object with its origin (file, line, column of every field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from diktyo.api.networking import DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService
from diktyo.api.security import AuthorizationPolicy, PeerAuthentication, RequestAuthentication
from diktyo.api.telemetry import Telemetry

NETWORKING = "networking.istio.io"
SECURITY = "security.istio.io"
TELEMETRY = "telemetry.istio.io"

# kind -> (group, accepted versions, spec model)
KINDS: dict[str, tuple[str, tuple[str, ...], type[BaseModel]]] = {
    "VirtualService": (NETWORKING, ("v1", "v1beta1", "v1alpha3"), VirtualService),
    "DestinationRule": (NETWORKING, ("v1", "v1beta1", "v1alpha3"), DestinationRule),
    "ServiceEntry": (NETWORKING, ("v1", "v1beta1", "v1alpha3"), ServiceEntry),
    "Gateway": (NETWORKING, ("v1", "v1beta1", "v1alpha3"), Gateway),
    "Sidecar": (NETWORKING, ("v1", "v1beta1", "v1alpha3"), Sidecar),
    "PeerAuthentication": (SECURITY, ("v1", "v1beta1"), PeerAuthentication),
    "AuthorizationPolicy": (SECURITY, ("v1", "v1beta1"), AuthorizationPolicy),
    "RequestAuthentication": (SECURITY, ("v1", "v1beta1"), RequestAuthentication),
    "Telemetry": (TELEMETRY, ("v1", "v1alpha1"), Telemetry),
}


@dataclass(frozen=True, eq=False)
class Resource:
    """A loaded, validated Istio resource.

    ``positions`` maps a dotted field path (``spec.http[0].route[1].weight``,
    ``metadata.name``) to its 1-based ``(line, col)`` in ``file``; ``line``/``col`` are
    where the document starts.
    """

    kind: str
    api_version: str
    name: str
    namespace: str
    spec: BaseModel
    file: str = ""
    line: int = 0
    col: int = 0
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``Kind/namespace/name``."""
        return f"{self.kind}/{self.namespace}/{self.name}"

    def position(self, path: str) -> tuple[int, int]:
        """Position of ``path`` or of its nearest present parent; the document start if none."""
        while path:
            pos = self.positions.get(path)
            if pos is not None:
                return pos
            path = _parent(path)
        return (self.line, self.col)


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    if "." in path:
        return path[: path.rindex(".")]
    return ""

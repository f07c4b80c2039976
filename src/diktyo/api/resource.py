"""Resource: one validated Istio object with its origin (file, line, column of every field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from diktyo.api.kinds import istio_kinds

# Implemented Istio kinds: kind -> (group, accepted versions, spec model). The full table,
# with Kubernetes and ignored kinds, is ``diktyo.api.kinds.KIND_TABLE``.
KINDS = istio_kinds()


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
    annotations: dict[str, str] = field(default_factory=dict)
    # the object's ``status`` as given (a WorkloadEntry's health condition lives there)
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def qualified_kind(self) -> str:
        """``Kind``, or ``Kind.group`` for the Gateway API (whose ``Gateway`` is not Istio's)."""
        group = self.api_version.rpartition("/")[0]
        return f"{self.kind}.{group}" if group == "gateway.networking.k8s.io" else self.kind

    @property
    def key(self) -> str:
        """``Kind/namespace/name`` (``Kind.group/...`` for the Gateway API)."""
        return f"{self.qualified_kind}/{self.namespace}/{self.name}"

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

"""What every check needs: the resources by kind, the registry, and how to report a problem."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from diktyo.api import ConfigError
from diktyo.control.model import Registry
from diktyo.control.translate.hosts import ConfigIndex, resolve_host


@dataclass
class Context:
    idx: ConfigIndex
    # host checks run only when something tells us which hosts exist
    registry_known: bool
    resources: list[Any] = field(default_factory=list)
    problems: list[ConfigError] = field(default_factory=list)

    @classmethod
    def build(cls, resources: Iterable[Any], registry: Registry | None) -> Context:
        resources = list(resources)
        idx = ConfigIndex.build(resources, registry or Registry())
        known = registry is not None or bool(idx.service_entries) or bool(idx.kube_services)
        return cls(idx=idx, registry_known=known, resources=resources)

    def report(
        self,
        res: Any,
        path: str,
        message: str,
        hint: str = "",
        severity: Literal["error", "warning", "info"] = "error",
    ) -> None:
        line, col = res.position(path)
        self.problems.append(
            ConfigError(
                res.file, line, col, path, f"{res.kind} {res.name}: {message}", hint, severity
            )
        )

    def resolve(self, host: str, namespace: str) -> str:
        return resolve_host(host, namespace, self.idx.registry.services)

    def where(self, res: Any) -> str:
        return f"{res.file}:{res.line}"

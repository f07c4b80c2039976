"""What every check needs: the resources by kind, the hosts that exist, and how to report."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from diktyo.control.model import Registry
from diktyo.control.translate.hosts import DOMAIN_SUFFIX, ConfigIndex, host_matches
from diktyo.control.validate.messages import (
    DIKTYO_CHECK,
    Finding,
    Level,
    MessageType,
    finding,
)


@dataclass(frozen=True, slots=True)
class KnownHost:
    """A host that exists: a registry service, a ServiceEntry host or a Kubernetes Service."""

    hostname: str  # FQDN, or a wildcard for ServiceEntry hosts like *.example.com
    namespace: str
    ports: tuple[int, ...]
    export_to: tuple[str, ...] = ()  # () = every namespace
    source: str = "registry"

    def visible_from(self, namespace: str) -> bool:
        if not self.export_to or "*" in self.export_to:
            return True
        for e in self.export_to:
            if e == "." and namespace == self.namespace:
                return True
            if e == namespace:
                return True
        return False


def fqdn(host: str, namespace: str) -> str:
    """Istio's short-name completion: ``reviews`` in ``default`` ->
    ``reviews.default.svc.cluster.local``; ``reviews.prod`` -> ``reviews.prod.svc.cluster.local``
    when no host of that exact name exists (decided by the caller)."""
    if "*" in host or "." in host:
        return host
    return f"{host}.{namespace}.svc.{DOMAIN_SUFFIX}"


@dataclass
class Context:
    idx: ConfigIndex
    # host checks run only when something tells us which hosts exist
    registry_known: bool
    resources: list[Any] = field(default_factory=list)
    problems: list[Finding] = field(default_factory=list)
    services: list[Any] = field(default_factory=list)  # Kubernetes Service resources
    hosts: list[KnownHost] = field(default_factory=list)
    _by_name: dict[str, list[KnownHost]] = field(default_factory=dict, repr=False)
    _wild: list[KnownHost] = field(default_factory=list, repr=False)
    _subsets: tuple[dict[str, set[str]], list[tuple[str, set[str]]]] | None = field(
        default=None, repr=False
    )

    @classmethod
    def build(cls, resources: Iterable[Any], registry: Registry | None) -> Context:
        resources = list(resources)
        idx = ConfigIndex.build(resources, registry or Registry())
        services = [r for r in resources if getattr(r, "kind", "") == "Service"]
        known = registry is not None or bool(idx.service_entries) or bool(services)
        ctx = cls(idx=idx, registry_known=known, resources=resources, services=services)
        ctx.hosts = ctx._known_hosts(registry)
        for kh in ctx.hosts:
            if "*" in kh.hostname:
                ctx._wild.append(kh)
            else:
                ctx._by_name.setdefault(kh.hostname, []).append(kh)
        return ctx

    def _known_hosts(self, registry: Registry | None) -> list[KnownHost]:
        out: list[KnownHost] = []
        for svc in (registry or Registry()).services:
            out.append(KnownHost(svc.hostname, svc.namespace, tuple(p.number for p in svc.ports)))
        for se in self.idx.service_entries:
            ports = tuple(p.number for p in se.spec.ports)
            export = tuple(se.spec.export_to)
            for h in se.spec.hosts:
                out.append(
                    KnownHost(fqdn(h, se.namespace), se.namespace, ports, export, "ServiceEntry")
                )
        for svc in self.services:
            spec = svc.spec
            ports = tuple(int(getattr(p, "port", 0) or 0) for p in getattr(spec, "ports", ()))
            export = _export_to_annotation(svc)
            out.append(
                KnownHost(
                    f"{svc.name}.{svc.namespace}.svc.{DOMAIN_SUFFIX}",
                    svc.namespace,
                    ports,
                    export,
                    "Service",
                )
            )
        return out

    def report(self, mt: Any, *args: Any, **kwargs: Any) -> None:
        """``report(MessageType, res, path, message, hint="", level=None)``.

        The older form ``report(res, path, message, hint="", severity="error")`` (checks
        written before the catalogue) still works and reports under ``DKT0100``.
        """
        if isinstance(mt, MessageType):
            self.problems.append(finding(mt, *args, **kwargs))
            return
        self._report_legacy(mt, *args, **kwargs)

    def _report_legacy(
        self,
        res: Any,
        path: str,
        message: str,
        hint: str = "",
        severity: Literal["error", "warning", "info"] = "error",
    ) -> None:
        level: Level = {"error": "Error", "warning": "Warning", "info": "Info"}[severity]  # type: ignore[assignment]  # dict values are Levels
        self.problems.append(finding(DIKTYO_CHECK, res, path, message, hint, level))

    def lookup(self, host: str, namespace: str) -> KnownHost | None:
        """The known host a destination ``host`` written in ``namespace`` names, or None."""
        candidates = [fqdn(host, namespace)]
        parts = host.split(".")
        if "*" not in host and len(parts) == 2:
            candidates.append(f"{host}.svc.{DOMAIN_SUFFIX}")
        elif "*" not in host and len(parts) == 3 and parts[2] == "svc":
            candidates.append(f"{host}.{DOMAIN_SUFFIX}")
        for cand in candidates:
            for kh in self._by_name.get(cand, ()):
                if kh.visible_from(namespace):
                    return kh
        for cand in candidates:
            for kh in self._wild:
                if host_matches(kh.hostname, cand) and kh.visible_from(namespace):
                    return kh
        return None

    def resolve(self, host: str, namespace: str) -> str:
        """The FQDN of ``host`` as written in ``namespace`` (a known host's name if one fits)."""
        kh = self.lookup(host, namespace)
        if kh is not None and "*" not in kh.hostname:
            return kh.hostname
        return fqdn(host, namespace)

    def subsets(self, host: str) -> set[str]:
        """Subset names the DestinationRules for ``host`` (an FQDN) define."""
        if self._subsets is None:
            exact: dict[str, set[str]] = {}
            wild: list[tuple[str, set[str]]] = []
            for dr in self.idx.destination_rules:
                dr_host = self.resolve(dr.spec.host, dr.namespace)
                names = {s.name for s in dr.spec.subsets}
                if "*" in dr_host:
                    wild.append((dr_host, names))
                else:
                    exact.setdefault(dr_host, set()).update(names)
            self._subsets = (exact, wild)
        exact, wild = self._subsets
        out = set(exact.get(host, ()))
        for pattern, names in wild:
            if host_matches(pattern, host):
                out |= names
        return out

    def suggest(self, host: str, namespace: str) -> str:
        """A 'did you mean' hint for an unknown host ('' when nothing is close)."""
        names: dict[str, str] = {}
        for kh in self.hosts:
            if not kh.visible_from(namespace) or "*" in kh.hostname:
                continue
            names[kh.hostname] = kh.hostname
            short = kh.hostname.removesuffix(f".{namespace}.svc.{DOMAIN_SUFFIX}")
            if short != kh.hostname:
                names[short] = short
        close = difflib.get_close_matches(host, list(names), n=1, cutoff=0.75)
        return f"did you mean {close[0]!r}?" if close else ""

    def where(self, res: Any) -> str:
        return f"{res.file}:{res.line}"


def _export_to_annotation(svc: Any) -> tuple[str, ...]:
    """A Kubernetes Service's ``networking.istio.io/exportTo`` annotation, if the loader kept it."""
    ann = getattr(svc, "annotations", None) or {}
    raw = ann.get("networking.istio.io/exportTo") if isinstance(ann, dict) else None
    if not raw:
        return ()
    return tuple(p.strip() for p in str(raw).split(",") if p.strip())

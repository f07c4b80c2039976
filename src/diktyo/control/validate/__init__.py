"""Validate: cross-resource checks behind ``diktyo analyze`` (one module per kind).

``analyze(resources, registry=None) -> list[ConfigError]``; load errors come from
``diktyo.api.load_paths`` and are not repeated here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diktyo.api import ConfigError
from diktyo.control.model import Registry, Service, ServicePort
from diktyo.control.validate import (
    delegation,
    destinationrule,
    gateway,
    serviceentry,
    telemetry,
    virtualservice,
)
from diktyo.control.validate.context import Context

__all__ = ["BOOKINFO_HOSTS", "analyze", "registry_for_hosts"]

BOOKINFO_HOSTS = ("productpage", "reviews", "ratings", "details")


def analyze(resources: Iterable[Any], registry: Registry | None = None) -> list[ConfigError]:
    """Problems across resources, sorted by file and line.

    Host existence is checked only when a ``registry`` is given or the input has
    ServiceEntries; then unknown hosts are warnings. Errors are things Istio would reject or
    that break traffic (undefined subsets, weights not adding up to 100, ...).
    """
    ctx = Context.build(resources, registry)
    _check_duplicates(ctx)
    for module in (virtualservice, delegation, destinationrule, gateway, serviceentry, telemetry):
        module.check(ctx)
    serviceentry.check_sidecars(ctx)
    return sorted(ctx.problems, key=lambda e: (e.file, e.line, e.col))


def registry_for_hosts(
    hosts: Iterable[str], namespace: str = "default", port: int = 9080
) -> Registry:
    """A registry of HTTP services named ``hosts`` (short names resolve in ``namespace``)."""
    services = []
    for h in hosts:
        fqdn = h if "." in h else f"{h}.{namespace}.svc.cluster.local"
        services.append(
            Service(
                hostname=fqdn,
                namespace=namespace,
                ports=(ServicePort(number=port),),
                short_name=h if "." not in h else "",
            )
        )
    return Registry(services=tuple(services))


def _check_duplicates(ctx: Context) -> None:
    seen: dict[str, Any] = {}
    for res in ctx.resources:
        first = seen.get(res.key)
        if first is None:
            seen[res.key] = res
            continue
        ctx.report(
            res,
            "metadata.name",
            f"already defined at {ctx.where(first)} (namespace {res.namespace})",
            "give it another name, or keep only one of the two (applied together, the later "
            "one replaces the earlier)",
        )

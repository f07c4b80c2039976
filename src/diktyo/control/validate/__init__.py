"""Validate: cross-resource checks behind ``diktyo analyze`` (one module per kind), with
Istio's analysis message codes and levels (``messages.py`` holds the catalogue).

``analyze(resources, registry=None) -> list[Finding]``; each Finding is a ``ConfigError``
(file, line, col, field, message, hint, severity) with the message's ``code`` and ``origin``.
Load errors come from ``diktyo.api.load_paths``; ``messages.from_load_error`` codes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diktyo.control.model import Registry, Service, ServicePort
from diktyo.control.validate import (
    delegation,
    deprecation,
    destinationrule,
    gateway,
    gatewayapi,
    service,
    serviceentry,
    sidecar,
    telemetry,
    telemetry_api,
    virtualservice,
)
from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context
from diktyo.control.validate.messages import CATALOGUE, Finding, from_load_error

__all__ = [
    "BOOKINFO_HOSTS",
    "CATALOGUE",
    "Finding",
    "analyze",
    "from_load_error",
    "registry_for_hosts",
]

BOOKINFO_HOSTS = ("productpage", "reviews", "ratings", "details")

# every analyzer, in the order they run (each takes the Context and reports into it)
ANALYZERS = (
    virtualservice.check,
    delegation.check,
    destinationrule.check,
    gateway.check,
    gatewayapi.check,
    serviceentry.check,
    sidecar.check,
    service.check,
    telemetry.check,
    telemetry_api.check,
    deprecation.check,
)


def analyze(resources: Iterable[Any], registry: Registry | None = None) -> list[Finding]:
    """Problems across resources, sorted by file and line.

    Host existence (IST0101 hosts, IST0174) is checked only when something says which hosts
    exist: a ``registry``, or ServiceEntries or Kubernetes Services in the input.
    """
    ctx = Context.build(resources, registry)
    _check_duplicates(ctx)
    for run in ANALYZERS:
        run(ctx)
    return sorted(ctx.problems, key=lambda e: (e.file, e.line, e.col, e.code))


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
            m.DUPLICATE_RESOURCE,
            res,
            "metadata.name",
            f"{res.kind} {res.namespace}/{res.name} is already defined at {ctx.where(first)}",
            "give it another name, or keep only one of the two (applied together, the later "
            "one replaces the earlier)",
        )

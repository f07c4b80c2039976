"""Gateway API checks: route and listener status conditions (Accepted, ResolvedRefs, ...).

The conditions are the ones the Gateway API defines and Istio writes into each object's
``status`` (``Accepted=False`` with ``NoMatchingParent``, ``NotAllowedByListeners``,
``NoMatchingListenerHostname``; ``ResolvedRefs=False`` with ``BackendNotFound``,
``RefNotPermitted``, ``InvalidKind``); diktyo has no status to write, so ``analyze`` reports
them. The decisions come from the same ``bind`` the translation uses.
"""

from __future__ import annotations

from typing import Any

from diktyo.api.gateway_api import GATEWAY_API
from diktyo.control.translate.gateway_api import ROUTE_KINDS, bind
from diktyo.control.translate.hosts import resolve_host
from diktyo.control.validate.context import Context
from diktyo.control.validate.messages import GATEWAY_API_CONDITION, Level

_LEVEL: dict[str, Level] = {"error": "Error", "warning": "Warning", "info": "Info"}
_ROUTE_QUALIFIED_KINDS = frozenset(f"{kind}.{GATEWAY_API}" for kind in ROUTE_KINDS)


def check(ctx: Context) -> None:
    services = ctx.idx.registry.services if ctx.registry_known else None
    gidx = bind(ctx.resources, services)
    for f in gidx.findings:
        ctx.report(GATEWAY_API_CONDITION, f.resource, f.path, f.message, f.hint, _LEVEL[f.severity])
    _mixed_with_virtual_services(ctx, gidx.mesh)
    _unsupported_filters(ctx)


def _mixed_with_virtual_services(
    ctx: Context, mesh: dict[str, list[tuple[object, int | None]]]
) -> None:
    """A Service with HTTPRoutes attached ignores the VirtualServices for it (one API per host)."""
    for vs in ctx.idx.virtual_services:
        if vs.spec.gateways and "mesh" not in vs.spec.gateways:
            continue
        for i, h in enumerate(vs.spec.hosts):
            host = resolve_host(h, vs.namespace, ctx.idx.registry.services)
            routes = mesh.get(host)
            if routes:
                rt: Any = routes[0][0]  # a Resource
                ctx.report(
                    GATEWAY_API_CONDITION,
                    vs,
                    f"spec.hosts[{i}]",
                    f"host {host} also has {rt.kind} {rt.namespace}/{rt.name} (parentRef "
                    f"Service); sidecars route it by the {rt.kind} and ignore this "
                    "VirtualService",
                    f"route a service with one API: remove the VirtualService or the {rt.kind}",
                    "Warning",
                )


def _unsupported_filters(ctx: Context) -> None:
    for rt in ctx.resources:
        if getattr(rt, "qualified_kind", "") not in _ROUTE_QUALIFIED_KINDS:
            continue
        for ri, rule in enumerate(rt.spec.rules):
            for fi, f in enumerate(rule.filters):
                path = f"spec.rules[{ri}].filters[{fi}]"
                if f.type == "ExtensionRef":
                    ctx.report(
                        GATEWAY_API_CONDITION,
                        rt,
                        path,
                        "ExtensionRef filters are not supported; requests matching this rule "
                        "get 500, as the Gateway API requires for an unresolved filter",
                        "remove the filter",
                    )

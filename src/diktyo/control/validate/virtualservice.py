"""VirtualService checks: subsets, hosts, weights, unreachable rules, conflicting actions."""

from __future__ import annotations

from typing import Any

from diktyo.control.translate.hosts import host_matches
from diktyo.control.validate.context import Context


def check(ctx: Context) -> None:
    gateways = {f"{g.namespace}/{g.name}" for g in ctx.idx.gateways}
    for vs in ctx.idx.virtual_services:
        spec = vs.spec
        mesh_bound = not spec.gateways or "mesh" in spec.gateways
        for i, h in enumerate(spec.hosts):
            if h == "*" and mesh_bound:
                ctx.report(
                    vs,
                    f"spec.hosts[{i}]",
                    "wildcard host * is not allowed for virtual services bound to the mesh",
                    "name the hosts, or bind it to a Gateway with 'gateways: [NAME]'",
                )
        for i, gw in enumerate(spec.gateways):
            if gw == "mesh":
                continue
            ref = gw if "/" in gw else f"{vs.namespace}/{gw}"
            if ref not in gateways:
                ctx.report(
                    vs,
                    f"spec.gateways[{i}]",
                    f"gateway {gw!r} not found",
                    "define a Gateway with that name (namespace/name for another namespace)",
                    "warning",
                )
        for i, rule in enumerate(spec.http):
            _check_rule(ctx, vs, i, rule)
        _check_shadowing(ctx, vs)
    _check_host_conflicts(ctx)


def _check_host_conflicts(ctx: Context) -> None:
    """Istio uses one VirtualService per host for sidecars (IST0109): report the others."""
    owner: dict[str, Any] = {}
    for vs in ctx.idx.virtual_services:
        if vs.spec.gateways and "mesh" not in vs.spec.gateways:
            continue
        for i, h in enumerate(vs.spec.hosts):
            host = ctx.resolve(h, vs.namespace)
            first = owner.get(host)
            if first is None:
                owner[host] = vs
            elif first is not vs and first.key != vs.key:  # same name: reported as duplicate
                ctx.report(
                    vs,
                    f"spec.hosts[{i}]",
                    f"host {host} is also routed by VirtualService {first.name} at "
                    f"{ctx.where(first)}; diktyo appends this one's rules after it",
                    "keep one VirtualService per host for the mesh",
                    "warning",
                )


def _check_rule(ctx: Context, vs: Any, i: int, rule: Any) -> None:
    base = f"spec.http[{i}]"
    if rule.delegate is not None:
        return  # a root route: delegation.py checks it
    if rule.rewrite is not None and rule.redirect is not None:
        ctx.report(
            vs,
            f"{base}.rewrite",
            "rewrite and redirect cannot be used together",
            "a redirect answers the client itself; drop one of them",
        )
    if rule.redirect is not None and rule.route:
        ctx.report(
            vs,
            f"{base}.redirect",
            "redirect and route cannot be used together",
            "a redirect answers the client itself; drop the route or the redirect",
        )
    if rule.direct_response is not None and rule.route:
        ctx.report(
            vs,
            f"{base}.directResponse",
            "directResponse and route cannot be used together",
            "drop the route or the directResponse",
        )
    if not rule.route and rule.redirect is None and rule.direct_response is None:
        ctx.report(
            vs,
            base,
            "rule has no route, redirect or directResponse",
            "add 'route: [{destination: {host: ...}}]'",
        )
    for j, rd in enumerate(rule.route):
        if rd.weight is not None and not 0 <= rd.weight <= 100:
            ctx.report(
                vs,
                f"{base}.route[{j}].weight",
                f"weight {rd.weight} must be between 0 and 100",
                "weights are percentages of the traffic",
            )
    if len(rule.route) > 1:
        total = sum(rd.weight or 0 for rd in rule.route)
        if total != 100:
            weights = ", ".join(str(rd.weight or 0) for rd in rule.route)
            ctx.report(
                vs,
                f"{base}.route",
                f"weights sum to {total} ({weights}), not 100",
                "make the destination weights add up to 100",
            )
    for j, rd in enumerate(rule.route):
        _check_destination(ctx, vs, f"{base}.route[{j}].destination", rd.destination)
    if rule.mirror is not None:
        _check_destination(ctx, vs, f"{base}.mirror", rule.mirror)
    for j, mp in enumerate(rule.mirrors):
        _check_destination(ctx, vs, f"{base}.mirrors[{j}].destination", mp.destination)
    if rule.fault is not None:
        for kind in ("delay", "abort"):
            part = getattr(rule.fault, kind)
            if part is not None and part.percentage is None and part.percent is None:
                ctx.report(
                    vs,
                    f"{base}.fault.{kind}",
                    f"fault {kind} without percentage is never injected (as in Istio)",
                    "add 'percentage: {value: 100}'",
                    "warning",
                )
    if rule.fault is not None and rule.fault.abort is not None:
        ab = rule.fault.abort
        if ab.http_status is None:
            ctx.report(
                vs,
                f"{base}.fault.abort",
                "only httpStatus aborts are supported; abort ignored",
                "use 'httpStatus: 503'",
                "warning",
            )
    if (
        rule.fault is not None
        and rule.fault.delay is not None
        and rule.fault.delay.fixed_delay is None
    ):
        ctx.report(
            vs,
            f"{base}.fault.delay",
            "only fixedDelay is supported; delay ignored",
            "use 'fixedDelay: 5s'",
            "warning",
        )


def _check_destination(ctx: Context, vs: Any, path: str, dest: Any) -> None:
    host = ctx.resolve(dest.host, vs.namespace)
    svc = ctx.idx.service(host)
    if svc is None and ctx.registry_known and "*" not in host:
        ctx.report(
            vs,
            f"{path}.host",
            f"host {dest.host!r} ({host}) not found in the registry",
            "check the spelling or add a ServiceEntry for it",
            "warning",
        )
    if svc is not None and dest.port is None and len(svc.ports) > 1:
        ports = ", ".join(str(p.number) for p in svc.ports)
        ctx.report(
            vs,
            f"{path}",
            f"{host} has several ports ({ports}) and no port is given",
            "add 'port: {number: N}' to the destination",
            "warning",
        )
    number = dest.port.number if dest.port is not None else None
    if svc is not None and number is not None and all(p.number != number for p in svc.ports):
        ports = ", ".join(str(p.number) for p in svc.ports)
        ctx.report(
            vs, f"{path}.port.number", f"{host} has no port {number}", f"use one of: {ports}"
        )
    if dest.subset:
        defined = _subsets(ctx, host)
        if dest.subset not in defined:
            hint = (
                f"subsets defined for {host}: {', '.join(sorted(defined))}"
                if defined
                else f"add a DestinationRule for {dest.host} with a subset named {dest.subset!r}"
            )
            ctx.report(
                vs, f"{path}.subset", f"subset {dest.subset!r} is not defined for host {host}", hint
            )


def _subsets(ctx: Context, host: str) -> set[str]:
    names: set[str] = set()
    for dr in ctx.idx.destination_rules:
        dr_host = ctx.resolve(dr.spec.host, dr.namespace)
        if dr_host == host or host_matches(dr_host, host):
            names.update(s.name for s in dr.spec.subsets)
    return names


def _is_catch_all(match: Any) -> bool:
    """A match with no condition, or only ``uri: {prefix: /}``."""
    data = match.model_dump(exclude_defaults=True, exclude={"name"})
    if not data:
        return True
    return bool(data == {"uri": {"prefix": "/"}})


def _check_shadowing(ctx: Context, vs: Any) -> None:
    rules = vs.spec.http
    seen: dict[str, tuple[int, int]] = {}
    for i, rule in enumerate(rules):
        catch_all = not rule.match or any(_is_catch_all(m) for m in rule.match)
        for k, m in enumerate(rule.match):
            key = repr(sorted(m.model_dump(exclude_defaults=True, exclude={"name"}).items()))
            if key in seen and seen[key][0] != i:
                pi, pk = seen[key]
                ctx.report(
                    vs,
                    f"spec.http[{i}].match[{k}]",
                    f"match is never used: http[{pi}].match[{pk}] above has the same conditions",
                    "remove it or make its conditions different",
                    "warning",
                )
            seen.setdefault(key, (i, k))
        if catch_all and i + 1 < len(rules):
            for j in range(i + 1, len(rules)):
                ctx.report(
                    vs,
                    f"spec.http[{j}]",
                    f"rule http[{j}] is never used: http[{i}] above matches every request",
                    "move the catch-all rule last (first matching rule wins)",
                    "warning",
                )
            return

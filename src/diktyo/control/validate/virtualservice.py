"""VirtualService checks: destinations (IST0101, IST0112), gateways (IST0101, IST0132),
mesh host conflicts (IST0109), unreachable rules (IST0130, IST0131), rule actions and weights."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from diktyo.control.translate.hosts import host_matches
from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context, fqdn


def check(ctx: Context) -> None:
    gateways = {f"{g.namespace}/{g.name}": g for g in ctx.idx.gateways}
    for vs in ctx.idx.virtual_services:
        spec = vs.spec
        mesh_bound = not spec.gateways or "mesh" in spec.gateways
        for i, h in enumerate(spec.hosts):
            if h == "*" and mesh_bound:
                ctx.report(
                    m.SCHEMA_VALIDATION_ERROR,
                    vs,
                    f"spec.hosts[{i}]",
                    "Schema validation error: wildcard host * is not allowed for virtual "
                    "services bound to the mesh gateway",
                    "name the hosts, or bind it to a Gateway with 'gateways: [NAME]'",
                )
        _check_gateways(ctx, vs, gateways)
        for i, rule in enumerate(spec.http):
            _check_rule(ctx, vs, i, rule)
        for path, dest, what in _destinations(vs):
            _check_destination(ctx, vs, path, dest, what)
        _check_unreachable(ctx, vs)
    _check_host_conflicts(ctx)
    _check_ingress_subsets(ctx)


def _check_ingress_subsets(ctx: Context) -> None:
    """Istio's IST0140: a VirtualService bound to gateways routes to a host without subset,
    while another VirtualService of that host splits it by subset: the subsets do not apply
    to the gateway's requests."""
    with_subsets: dict[str, list[Any]] = {}  # destination host -> VirtualServices
    for vs in ctx.idx.virtual_services:
        for rule in vs.spec.http:
            for rd in rule.route:
                d = rd.destination
                if d.subset and d.host in vs.spec.hosts:
                    lst = with_subsets.setdefault(d.host, [])
                    if vs not in lst:
                        lst.append(vs)
    for vs in ctx.idx.virtual_services:
        if not set(vs.spec.gateways) - {"mesh"}:
            continue  # bound to the mesh only: no gateway requests (Istio also reports these)
        for i, rule in enumerate(vs.spec.http):
            for j, rd in enumerate(rule.route):
                if rd.destination.subset:
                    continue
                for other in with_subsets.get(rd.destination.host, []):
                    ctx.report(
                        m.INGRESS_ROUTE_RULES_NOT_AFFECTED,
                        vs,
                        f"spec.http[{i}].route[{j}].destination.host",
                        f"Subset in virtual service {other.namespace}/{other.name} has no effect "
                        f"on ingress gateway {vs.namespace}/{vs.name} requests",
                        "route the gateway's requests to the subsets too, or send them to the "
                        "host through the mesh",
                    )


# ----------------------------------------------------------------------------- gateways


def _check_gateways(ctx: Context, vs: Any, gateways: dict[str, Any]) -> None:
    for i, gw in enumerate(vs.spec.gateways):
        if gw == "mesh":
            continue
        ref = gw if "/" in gw else f"{vs.namespace}/{gw}"
        found = gateways.get(ref)
        if found is None:
            close = difflib.get_close_matches(ref, list(gateways), n=1, cutoff=0.75)
            ctx.report(
                m.REFERENCED_RESOURCE_NOT_FOUND,
                vs,
                f"spec.gateways[{i}]",
                f'Referenced gateway not found: "{gw}"',
                f"did you mean {close[0]!r}?"
                if close
                else "define a Gateway with that name (namespace/name for another namespace)",
            )
        if vs.spec.hosts and not _host_in_gateway(found, vs.spec.hosts, vs.namespace):
            hosts = "[" + " ".join(vs.spec.hosts) + "]"
            ctx.report(
                m.VS_HOST_NOT_FOUND_IN_GATEWAY,
                vs,
                f"spec.gateways[{i}]",
                f"one or more host {hosts} defined in VirtualService {vs.namespace}/{vs.name} "
                f"not found in Gateway {ref}.",
                "add the host to one of the Gateway's servers, or fix the VirtualService's hosts",
            )


def _gateway_hosts(gw: Any, vs_namespace: str) -> list[str]:
    """The Gateway's server hosts as seen from ``vs_namespace`` (Istio's ``ns/host`` rules)."""
    out: list[str] = []
    for server in gw.spec.servers:
        for h in server.hosts:
            ns, sep, name = h.partition("/")
            if not sep:
                out.append(h)
            elif ns == "*" or ns == vs_namespace or (ns == "." and gw.namespace == vs_namespace):
                out.append(name)
    return out


def overlaps(a: str, b: str) -> bool:
    """Istio's ``host.Name.Matches``: equal, or one wildcard covers the other."""
    return host_matches(a, b) or host_matches(b, a)


def _host_in_gateway(gw: Any | None, hosts: list[str], vs_namespace: str) -> bool:
    if gw is None:
        return False
    return any(overlaps(gh, vh) for gh in _gateway_hosts(gw, vs_namespace) for vh in hosts)


# ----------------------------------------------------------------------------- IST0109


def _check_host_conflicts(ctx: Context) -> None:
    """Istio's ConflictingMeshGatewayHostsAnalyzer: VirtualServices bound to the mesh that
    define the same host in the same export scope; a host exported to every namespace also
    conflicts with any overlapping (wildcard) host of a narrower scope."""
    # a VirtualService defined twice (same namespace/name) is one resource: the later copy
    # replaces the earlier (DKT0101), so copies never conflict with each other
    by_scoped: dict[tuple[str, str], list[str]] = {}
    copies: dict[str, list[Any]] = {}
    for vs in ctx.idx.virtual_services:
        spec = vs.spec
        if spec.gateways and "mesh" not in spec.gateways:
            continue
        key = f"{vs.namespace}/{vs.name}"
        copies.setdefault(key, []).append(vs)
        if not spec.export_to or "*" in spec.export_to:
            scopes = ["*"]
        else:
            scopes = sorted({vs.namespace if e == "." else e for e in spec.export_to})
        for scope in scopes:
            for h in spec.hosts:
                lst = by_scoped.setdefault((scope, fqdn(h, vs.namespace)), [])
                if key not in lst:
                    lst.append(key)
    reported: set[int] = set()
    for (scope, host), keys in by_scoped.items():
        group = list(keys)
        if scope != "*":
            for (s2, h2), others in by_scoped.items():
                if s2 == "*" and overlaps(host, h2):
                    group.extend(k for k in others if k not in group)
        if len(group) < 2:
            continue
        names = ",".join(group)
        for key in group:
            for vs in copies[key]:
                if id(vs) in reported:
                    continue
                reported.add(id(vs))
                peers = ", ".join(f"{k} at {ctx.where(copies[k][0])}" for k in group if k != key)
                ctx.report(
                    m.CONFLICTING_MESH_GATEWAY_VS_HOSTS,
                    vs,
                    "metadata.name",
                    f"The VirtualServices {names} associated with mesh gateway define the same "
                    f"host {scope}/{host} which can lead to undefined behavior. This can be fixed "
                    "by merging the conflicting VirtualServices into a single resource.",
                    f"conflicts with {peers}; diktyo appends the later VirtualService's rules "
                    "after the earlier one's",
                )


# ----------------------------------------------------------------------------- rules


def _check_rule(ctx: Context, vs: Any, i: int, rule: Any) -> None:
    base = f"spec.http[{i}]"
    if rule.delegate is not None:
        return  # a root route: delegation.py checks it
    if rule.rewrite is not None and rule.redirect is not None:
        ctx.report(
            m.SCHEMA_VALIDATION_ERROR,
            vs,
            f"{base}.rewrite",
            "Schema validation error: rewrite may not be used with redirect",
            "a redirect answers the client itself; drop one of them",
        )
    if rule.redirect is not None and rule.route:
        ctx.report(
            m.SCHEMA_VALIDATION_ERROR,
            vs,
            f"{base}.redirect",
            "Schema validation error: HTTP route cannot contain both route and redirect",
            "a redirect answers the client itself; drop the route or the redirect",
        )
    if rule.direct_response is not None and rule.route:
        ctx.report(
            m.SCHEMA_VALIDATION_ERROR,
            vs,
            f"{base}.directResponse",
            "Schema validation error: HTTP route cannot contain both route and direct response",
            "drop the route or the directResponse",
        )
    if not rule.route and rule.redirect is None and rule.direct_response is None:
        ctx.report(
            m.SCHEMA_VALIDATION_ERROR,
            vs,
            base,
            "Schema validation error: HTTP route, redirect, direct response or delegate "
            "is required",
            "add 'route: [{destination: {host: ...}}]'",
        )
    for j, rd in enumerate(rule.route):
        if rd.weight is not None and not 0 <= rd.weight <= 100:
            ctx.report(
                m.ROUTE_WEIGHTS,
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
                m.ROUTE_WEIGHTS,
                vs,
                f"{base}.route",
                f"weights sum to {total} ({weights}), not 100",
                "make the destination weights add up to 100",
            )
    fault = rule.fault
    if fault is not None:
        for kind in ("delay", "abort"):
            part = getattr(fault, kind)
            if part is not None and part.percentage is None and part.percent is None:
                ctx.report(
                    m.FAULT_NEVER_INJECTED,
                    vs,
                    f"{base}.fault.{kind}",
                    f"fault {kind} without percentage is never injected (as in Istio)",
                    "add 'percentage: {value: 100}'",
                )
        if fault.abort is not None and fault.abort.http_status is None:
            ctx.report(
                m.UNSUPPORTED,
                vs,
                f"{base}.fault.abort",
                "only httpStatus aborts are supported by diktyo; abort ignored",
                "use 'httpStatus: 503'",
            )
        if fault.delay is not None and fault.delay.fixed_delay is None:
            ctx.report(
                m.UNSUPPORTED,
                vs,
                f"{base}.fault.delay",
                "only fixedDelay is supported by diktyo; delay ignored",
                "use 'fixedDelay: 5s'",
            )


# ----------------------------------------------------------------------------- destinations


def _destinations(vs: Any) -> Iterator[tuple[str, Any, str]]:
    """(field path, Destination, 'route' | 'mirror') of every http, tcp and tls route."""
    for i, rule in enumerate(vs.spec.http):
        for j, rd in enumerate(rule.route):
            yield f"spec.http[{i}].route[{j}].destination", rd.destination, "route"
        if rule.mirror is not None:
            yield f"spec.http[{i}].mirror", rule.mirror, "mirror"
        for j, mp in enumerate(rule.mirrors):
            yield f"spec.http[{i}].mirrors[{j}].destination", mp.destination, "mirror"
    for kind in ("tcp", "tls"):
        for i, rule in enumerate(getattr(vs.spec, kind)):
            for j, rd in enumerate(rule.route):
                yield f"spec.{kind}[{i}].route[{j}].destination", rd.destination, "route"


def _check_destination(ctx: Context, vs: Any, path: str, dest: Any, what: str) -> None:
    known = ctx.lookup(dest.host, vs.namespace)
    if known is None and ctx.registry_known:
        reftype = "host" if what == "route" else "mirror host"
        hint = ctx.suggest(dest.host, vs.namespace) or (
            "check the spelling, or add a ServiceEntry or Kubernetes Service for it"
        )
        ctx.report(
            m.REFERENCED_RESOURCE_NOT_FOUND,
            vs,
            f"{path}.host",
            f'Referenced {reftype} not found: "{dest.host}"',
            hint,
        )
    if known is not None and known.ports:
        if dest.port is None and len(known.ports) > 1:
            ports = "[" + " ".join(str(p) for p in known.ports) + "]"
            ctx.report(
                m.VS_DESTINATION_PORT_SELECTOR_REQUIRED,
                vs,
                f"{path}.host",
                f'This VirtualService routes to a service "{dest.host}" that exposes multiple '
                f"ports {ports}. Specifying a port in the destination is required to "
                "disambiguate.",
                "add 'port: {number: N}' to the destination",
            )
        elif dest.port is not None and dest.port.number not in known.ports:
            ctx.report(
                m.REFERENCED_RESOURCE_NOT_FOUND,
                vs,
                f"{path}.port.number",
                f'Referenced host:port not found: "{dest.host}:{dest.port.number}"',
                "use one of: " + ", ".join(str(p) for p in known.ports),
            )
    if dest.subset:
        host = ctx.resolve(dest.host, vs.namespace)
        defined = ctx.subsets(host)
        if dest.subset not in defined:
            reftype = "host+subset" if what == "route" else "mirror+subset"
            close = difflib.get_close_matches(dest.subset, sorted(defined), n=1)
            if close:
                hint = (
                    f"did you mean {close[0]!r}? (subsets of {host}: {', '.join(sorted(defined))})"
                )
            elif defined:
                hint = f"subsets defined for {host}: {', '.join(sorted(defined))}"
            else:
                hint = f"add a DestinationRule for {dest.host} with a subset named {dest.subset!r}"
            ctx.report(
                m.REFERENCED_RESOURCE_NOT_FOUND,
                vs,
                f"{path}.subset",
                f'Referenced {reftype} in destinationrule not found: "{dest.host}+{dest.subset}"',
                hint,
            )


# ----------------------------------------------------------------------------- IST0130/0131


def _is_catch_all(match: Any) -> bool:
    """A match with no condition, or only ``uri: {prefix: /}``."""
    data = match.model_dump(exclude_defaults=True, exclude={"name"})
    if not data:
        return True
    return bool(data == {"uri": {"prefix": "/"}})


def _name(obj: Any, i: int) -> str:
    """Istio's way of naming a rule or match in messages: its quoted name, else ``#i``."""
    name = getattr(obj, "name", None)
    return f'"{name}"' if name else f"#{i}"


def _match_key(match: Any) -> str:
    return repr(sorted(match.model_dump(exclude_defaults=True, exclude={"name"}).items()))


def _check_unreachable(ctx: Context, vs: Any) -> None:
    """Istio's unreachable-rule analysis of http, tcp and tls rules: a second rule without
    match (IST0130), a match repeating an earlier one (IST0131) and a rule all of whose
    matches repeat earlier ones (IST0130). diktyo adds: an HTTP rule after one that matches
    every request (no match, an empty match or ``uri: {prefix: /}``) is never used."""
    for kind in ("http", "tcp", "tls"):
        rules = getattr(vs.spec, kind)
        seen: dict[str, tuple[int, int]] = {}
        empty_at = -1
        catch_all_at = -1
        for i, rule in enumerate(rules):
            base = f"spec.{kind}[{i}]"
            if not rule.match:
                if empty_at >= 0:
                    _unreachable(
                        ctx,
                        vs,
                        base,
                        rule,
                        i,
                        "only the last rule can have no matches",
                        f"{kind}[{empty_at}] above has no match either; keep one such rule, last",
                    )
                elif catch_all_at >= 0:
                    _after_catch_all(ctx, vs, base, rule, i, kind, catch_all_at)
                empty_at = i
                if catch_all_at < 0:
                    catch_all_at = i
                continue
            duplicates = 0
            for k, match in enumerate(rule.match):
                key = _match_key(match)
                if key in seen:
                    pi, pk = seen[key]
                    duplicates += 1
                    ctx.report(
                        m.VS_INEFFECTIVE_MATCH,
                        vs,
                        f"{base}.match[{k}]",
                        f"VirtualService rule {_name(rule, i)} match {_name(match, k)} is not "
                        f"used (duplicate/overlapping match in rule {_name(rules[pi], pi)}).",
                        f"{kind}[{pi}].match[{pk}] has the same conditions; remove this one or "
                        "make its conditions different",
                    )
                else:
                    seen[key] = (i, k)
            if duplicates == len(rule.match):
                _unreachable(
                    ctx,
                    vs,
                    base,
                    rule,
                    i,
                    "all matches used by prior rules",
                    "every match of this rule is an earlier rule's; remove it or make "
                    "its matches different",
                )
            elif catch_all_at >= 0 and kind == "http":
                _after_catch_all(ctx, vs, base, rule, i, kind, catch_all_at)
            if kind == "http" and catch_all_at < 0 and any(_is_catch_all(x) for x in rule.match):
                catch_all_at = i


def _unreachable(
    ctx: Context, vs: Any, path: str, rule: Any, i: int, reason: str, hint: str
) -> None:
    ctx.report(
        m.VS_UNREACHABLE_RULE,
        vs,
        path,
        f"VirtualService rule {_name(rule, i)} not used ({reason}).",
        hint,
    )


def _after_catch_all(
    ctx: Context, vs: Any, path: str, rule: Any, i: int, kind: str, at: int
) -> None:
    _unreachable(
        ctx,
        vs,
        path,
        rule,
        i,
        "a prior rule matches every request",
        f"{kind}[{at}] above matches every request; move the catch-all rule last (the first "
        "matching rule wins)",
    )

"""Route tables: the outbound table (a virtual host per service and HTTP port) and gateway tables.

Rules come from VirtualServices in input order, first matching rule wins. Match conditions
that depend on the client (``sourceLabels``, ``sourceNamespace``, ``gateways``, ``port``) are
decided here, for this proxy, as Istio does: a match that cannot apply is dropped, and a rule
whose matches are all dropped is dropped. Destinations become cluster names; ``needed``
collects every (host, port, subset) a route points at so that its cluster exists.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from diktyo.control.model import ProxyNode, Service
from diktyo.control.translate import gateway_api
from diktyo.control.translate.delegation import find_delegate, merge_route, resolve_destinations
from diktyo.control.translate.hosts import (
    ConfigIndex,
    host_matches,
    is_http,
    protocol_of,
    resolve_host,
    selector_matches,
    split_cluster_host,
)
from diktyo.core.grpc_status import HTTP_STATUS as GRPC_HTTP_STATUS
from diktyo.core.grpc_status import parse_status
from diktyo.snapshot.model import (
    DirectResponse,
    Fault,
    FaultAbort,
    FaultDelay,
    HeaderOps,
    Headers,
    KeyMatch,
    Mirror,
    Redirect,
    RetryPolicy,
    Rewrite,
    Route,
    RouteMatch,
    RouteSource,
    RouteTable,
    StringMatch,
    VirtualHost,
    WeightedCluster,
    cluster_name,
)

MESH = "mesh"


@dataclass
class RouteContext:
    """What routes need while translating: the index, the proxy, and the clusters referenced."""

    idx: ConfigIndex
    proxy: ProxyNode
    needed: set[tuple[str, int, str]] = field(default_factory=set)
    # the Sidecar resource's egress scope; None = every service is visible
    visible: Callable[[Service, int | None], bool] | None = None


# --------------------------------------------------------------------------- outbound


def http_ports(svc: Service) -> list[int]:
    return [p.number for p in svc.ports if is_http(protocol_of(p.name, p.protocol))]


def service_domains(svc: Service, port: int, proxy_ns: str) -> list[str]:
    """Every spelling of ``svc`` on ``port`` a client may put in Host."""
    names = [svc.hostname]
    split = split_cluster_host(svc.hostname)
    if split is not None:
        name, ns = split
        names = [name] if ns == proxy_ns else []
        names += [f"{name}.{ns}", f"{name}.{ns}.svc", svc.hostname]
    bare = port == 80 or len(http_ports(svc)) == 1
    out = [f"{n}:{port}" for n in names]
    if bare:
        out += names
    return out


def build_outbound_table(ctx: RouteContext) -> RouteTable:
    vhosts: list[VirtualHost] = []
    used: set[str] = set()
    ns = ctx.proxy.node.namespace
    visible = ctx.visible
    for svc in ctx.idx.registry.services:
        for port in http_ports(svc):
            if visible is not None and not visible(svc, port):
                continue
            domains = [d for d in service_domains(svc, port, ns) if d not in used]
            used.update(domains)
            if not domains:
                continue
            routes = gateway_api.mesh_routes(ctx, svc, port) or []  # GAMMA HTTPRoutes win
            for vs in [] if routes else ctx.idx.mesh_virtual_services(svc.hostname):
                routes += vs_routes(ctx, vs, port, gateway=None, default_host=svc.hostname)
            if not routes:
                routes = [default_route(ctx, svc, port)]
            vhosts.append(
                VirtualHost(
                    name=f"{svc.hostname}:{port}", domains=tuple(domains), routes=tuple(routes)
                )
            )
    # Istio also routes VirtualService hosts that no service backs (e.g. a host answered by
    # a directResponse, or one whose destinations are other services), on port 80.
    for host, vss in ctx.idx.unbacked_mesh_hosts():
        bare = Service(hostname=host, namespace=vss[0].namespace, ports=())
        domains = [d for d in _unbacked_domains(bare, ns) if d not in used]
        used.update(domains)
        routes = []
        for vs in vss:
            routes += vs_routes(ctx, vs, 80, gateway=None, default_host=host)
        if domains and routes:
            vhosts.append(
                VirtualHost(name=f"{host}:80", domains=tuple(domains), routes=tuple(routes))
            )
    return RouteTable(name="outbound", virtual_hosts=tuple(vhosts))


def _unbacked_domains(svc: Service, proxy_ns: str) -> list[str]:
    names = [svc.hostname]
    split = split_cluster_host(svc.hostname)
    if split is not None:
        name, ns = split
        names = ([name] if ns == proxy_ns else []) + [
            f"{name}.{ns}",
            f"{name}.{ns}.svc",
            svc.hostname,
        ]
    return [f"{n}:80" for n in names] + names


def default_route(ctx: RouteContext, svc: Service, port: int) -> Route:
    ctx.needed.add((svc.hostname, port, ""))
    return Route(
        name="default",
        clusters=(
            WeightedCluster(
                cluster=cluster_name(port, "", svc.hostname),
                weight=100,
                host=svc.hostname,
                port=port,
            ),
        ),
        source=RouteSource(kind="", name="", namespace=svc.namespace),
    )


# --------------------------------------------------------------------------- rules


def vs_routes(
    ctx: RouteContext, vs: Any, port: int, gateway: str | None, default_host: str
) -> list[Route]:
    """The routes of one VirtualService for a virtual host on ``port``.

    ``gateway`` is ``namespace/name`` of the Gateway for gateway tables, None for the mesh."""
    out: list[Route] = []
    for i, rule in enumerate(vs.spec.http):
        if rule.delegate is not None:
            out += delegated_routes(ctx, vs, i, rule, port, gateway)
            continue
        r = _rule_route(ctx, vs, i, rule, port, gateway)
        if r is not None:
            out.append(r)
    return out


def _rule_route(
    ctx: RouteContext, vs: Any, i: int, rule: Any, port: int, gateway: str | None
) -> Route | None:
    if not rule.route and rule.redirect is None and rule.direct_response is None:
        return None
    matches: list[RouteMatch] = []
    for m in rule.match:
        rm = route_match(ctx, vs, m, port, gateway)
        if rm is not None:
            matches.append(rm)
    if rule.match and not matches:
        return None
    return route(ctx, vs, i, rule, tuple(matches), port)


def delegated_routes(
    ctx: RouteContext, vs: Any, i: int, rule: Any, port: int, gateway: str | None
) -> list[Route]:
    """Root route ``vs.spec.http[i]`` replaced by its delegate's routes, merged as Istio does
    (``delegation.py``); none when the delegate is missing or not exported to the root."""
    dvs, _why = find_delegate(ctx.idx.delegates, vs, rule)
    if dvs is None:
        return []
    services = ctx.idx.registry.services
    root_rule = resolve_destinations(rule, vs.namespace, services)
    out: list[Route] = []
    for j, leaf in enumerate(dvs.spec.http):
        merged = merge_route(root_rule, resolve_destinations(leaf, dvs.namespace, services))
        if merged is None:
            continue
        r = _rule_route(ctx, vs, i, merged, port, gateway)
        if r is None:
            continue
        line, _ = dvs.position(f"spec.http[{j}]")
        source = msgspec.structs.replace(
            r.source,
            delegate=f"{dvs.namespace}/{dvs.name}",
            delegate_rule=j,
            delegate_file=dvs.file,
            delegate_line=line,
        )
        out.append(msgspec.structs.replace(r, source=source))
    return out


def _applies(ctx: RouteContext, vs: Any, m: Any, port: int, gateway: str | None) -> bool:
    node = ctx.proxy.node
    if m.port is not None and m.port != port:
        return False
    if m.gateways:
        names = {_gateway_ref(g, vs.namespace) for g in m.gateways}
        if (gateway or MESH) not in names:
            return False
    if m.source_labels and (
        gateway is not None or not selector_matches(m.source_labels, node.labels)
    ):
        return False
    return m.source_namespace is None or m.source_namespace == node.namespace


def _gateway_ref(ref: str, namespace: str) -> str:
    if ref == MESH or "/" in ref:
        return ref
    return f"{namespace}/{ref}"


def string_match(sm: Any) -> StringMatch | None:
    if sm is None:
        return None
    if sm.exact is not None:
        return StringMatch(kind="exact", value=sm.exact)
    if sm.prefix is not None:
        return StringMatch(kind="prefix", value=sm.prefix)
    if sm.regex is not None:
        return StringMatch(kind="regex", value=sm.regex)
    return StringMatch(kind="present")


def _key_matches(d: dict[str, Any], lower: bool) -> tuple[KeyMatch, ...]:
    out = []
    for name, sm in d.items():
        match = string_match(sm)
        assert match is not None
        out.append(KeyMatch(name=name.lower() if lower else name, match=match))
    return tuple(out)


def route_match(
    ctx: RouteContext, vs: Any, m: Any, port: int, gateway: str | None
) -> RouteMatch | None:
    if not _applies(ctx, vs, m, port, gateway):
        return None
    return RouteMatch(
        name=m.name or "",
        uri=string_match(m.uri),
        scheme=string_match(m.scheme),
        method=string_match(m.method),
        authority=string_match(m.authority),
        headers=_key_matches(m.headers, lower=True),
        without_headers=_key_matches(m.without_headers, lower=True),
        query_params=_key_matches(m.query_params, lower=False),
        ignore_uri_case=m.ignore_uri_case,
        port=m.port,
    )


def _header_ops(ops: Any) -> HeaderOps | None:
    if ops is None:
        return None
    return HeaderOps(set=dict(ops.set), add=dict(ops.add), remove=tuple(ops.remove))


def headers(h: Any) -> Headers | None:
    if h is None:
        return None
    return Headers(request=_header_ops(h.request), response=_header_ops(h.response))


def destination(ctx: RouteContext, vs: Any, dest: Any, port: int) -> tuple[str, int, str]:
    """(host FQDN, port, subset) of an Istio Destination; the port defaults to the service's
    only port, else the port of the virtual host being built."""
    services = ctx.idx.registry.services
    host = resolve_host(dest.host, vs.namespace, services)
    if dest.port is not None and dest.port.number:
        dport = dest.port.number
    else:
        svc = ctx.idx.service(host)
        if svc is not None and len(svc.ports) == 1:
            dport = svc.ports[0].number
        elif svc is not None and any(p.number == port for p in svc.ports):
            dport = port
        elif svc is not None and http_ports(svc):
            dport = http_ports(svc)[0]
        else:
            dport = port
    subset = dest.subset or ""
    ctx.needed.add((host, dport, subset))
    return host, dport, subset


def _percent(p: Any, legacy: int | None = None, default: float = 100.0) -> float:
    if p is not None:
        return float(p.value)
    if legacy is not None:
        return float(legacy)
    return default


def retry_policy(r: Any) -> RetryPolicy | None:
    """Istio's ConvertPolicy: no ``retries`` -> None (the proxy's default, 2 attempts);
    ``attempts`` unset or 0 -> retries off; else the default policy with the given fields."""
    if r is None:
        return None
    if not r.attempts or r.attempts <= 0:
        return RetryPolicy(attempts=0)
    kw: dict[str, Any] = {"attempts": r.attempts}
    if r.per_try_timeout is not None:
        kw["per_try_timeout"] = r.per_try_timeout
    if r.retry_on:
        conds: list[str] = []
        codes: list[int] = []
        for part in (p.strip() for p in r.retry_on.split(",")):
            if not part:
                continue
            if part.isdigit():
                codes.append(int(part))
            elif part not in conds:
                conds.append(part)
        if codes and "retriable-status-codes" not in conds:
            conds.append("retriable-status-codes")
        kw["retry_on"] = tuple(conds)
        kw["retriable_status_codes"] = tuple(codes)
    return RetryPolicy(**kw)


def fault(f: Any) -> Fault | None:
    """Istio's translation: a fault without ``percentage`` (or legacy ``percent``) applies to
    0 % of requests, which is what Envoy does with an unset percentage (istio/istio#36303)."""
    if f is None:
        return None
    delay = abort = None
    if f.delay is not None and f.delay.fixed_delay is not None:
        delay = FaultDelay(
            fixed_delay=f.delay.fixed_delay,
            percentage=_percent(f.delay.percentage, f.delay.percent, 0.0),
        )
    if f.abort is not None and f.abort.http_status is not None:
        abort = FaultAbort(
            http_status=f.abort.http_status,
            percentage=_percent(f.abort.percentage, f.abort.percent, 0.0),
        )
    elif f.abort is not None and parse_status(f.abort.grpc_status) is not None:
        code = parse_status(f.abort.grpc_status)
        assert code is not None
        abort = FaultAbort(
            http_status=GRPC_HTTP_STATUS.get(code, 500),
            grpc_status=code,
            percentage=_percent(f.abort.percentage, f.abort.percent, 0.0),
        )
    if delay is None and abort is None:
        return None
    return Fault(delay=delay, abort=abort)


def _body(b: Any) -> str:
    if b is None:
        return ""
    if b.string is not None:
        return str(b.string)
    if b.bytes is not None:
        try:
            return base64.b64decode(b.bytes).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return ""
    return ""


def route(
    ctx: RouteContext, vs: Any, index: int, rule: Any, matches: tuple[RouteMatch, ...], port: int
) -> Route:
    clusters: list[WeightedCluster] = []
    single = len(rule.route) == 1
    for rd in rule.route:
        host, dport, subset = destination(ctx, vs, rd.destination, port)
        weight = rd.weight if rd.weight is not None else (100 if single else 0)
        clusters.append(
            WeightedCluster(
                cluster=cluster_name(dport, subset, host),
                weight=weight,
                host=host,
                subset=subset,
                port=dport,
                headers=headers(rd.headers),
            )
        )
    if clusters and all(c.weight == 0 for c in clusters):
        # Istio: all-zero weights would send nothing; treat as equal split (analyze reports it)
        clusters = [_with_weight(c, 100 // len(clusters)) for c in clusters]
    redirect = None
    if rule.redirect is not None:
        rr = rule.redirect
        redirect = Redirect(
            uri=rr.uri,
            authority=rr.authority,
            scheme=rr.scheme,
            port=rr.port,
            code=rr.redirect_code or 301,
        )
    direct = None
    if rule.direct_response is not None:
        direct = DirectResponse(
            status=rule.direct_response.status, body=_body(rule.direct_response.body)
        )
    rewrite = None
    if rule.rewrite is not None:
        rw = rule.rewrite
        rewrite = Rewrite(
            uri=rw.uri,
            authority=rw.authority,
            uri_regex=rw.uri_regex_rewrite.match if rw.uri_regex_rewrite else None,
            uri_regex_rewrite=rw.uri_regex_rewrite.rewrite if rw.uri_regex_rewrite else None,
        )
    mirrors: list[Mirror] = []
    if rule.mirror is not None:
        host, dport, subset = destination(ctx, vs, rule.mirror, port)
        legacy = (
            rule.mirror_percent if rule.mirror_percent is not None else rule.mirror_percent_legacy
        )
        mirrors.append(
            Mirror(
                cluster=cluster_name(dport, subset, host),
                host=host,
                subset=subset,
                port=dport,
                percentage=_percent(rule.mirror_percentage, legacy),
            )
        )
    for mp in rule.mirrors:
        host, dport, subset = destination(ctx, vs, mp.destination, port)
        mirrors.append(
            Mirror(
                cluster=cluster_name(dport, subset, host),
                host=host,
                subset=subset,
                port=dport,
                percentage=_percent(mp.percentage),
            )
        )
    line, _ = vs.position(f"spec.http[{index}]")
    return Route(
        name=rule.name or "",
        matches=matches,
        clusters=tuple(clusters),
        redirect=redirect,
        direct_response=direct,
        rewrite=rewrite,
        headers=headers(rule.headers),
        timeout=rule.timeout,
        retries=retry_policy(rule.retries),
        fault=fault(rule.fault),
        mirrors=tuple(mirrors),
        source=RouteSource(
            kind="VirtualService",
            name=vs.name,
            namespace=vs.namespace,
            rule=index,
            rule_name=rule.name or "",
            file=vs.file,
            line=line,
        ),
    )


def _with_weight(c: WeightedCluster, weight: int) -> WeightedCluster:
    return WeightedCluster(
        cluster=c.cluster,
        weight=weight,
        host=c.host,
        subset=c.subset,
        port=c.port,
        headers=c.headers,
    )


# --------------------------------------------------------------------------- gateways


def gateway_servers(ctx: RouteContext) -> dict[int, list[tuple[Any, Any]]]:
    """HTTP servers of the Gateways that select this proxy: port number -> [(gateway, server)]."""
    out: dict[int, list[tuple[Any, Any]]] = {}
    labels = ctx.proxy.node.labels
    for gw in ctx.idx.gateways:
        if not selector_matches(gw.spec.selector, labels):
            continue
        for server in gw.spec.servers:
            if not is_http(protocol_of(server.port.name, server.port.protocol)):
                continue
            out.setdefault(server.port.number, []).append((gw, server))
    for port, listeners in gateway_api.gateway_servers(ctx).items():  # Gateway API Gateways
        out.setdefault(port, []).extend(listeners)
    return out


def _server_host_matches(server_host: str, gw_ns: str, vs: Any, vs_host: str) -> bool:
    if "/" in server_host:
        ns, _, server_host = server_host.partition("/")
        if ns not in ("*", ".") and ns != vs.namespace:
            return False
        if ns == "." and vs.namespace != gw_ns:
            return False
    return host_matches(server_host, vs_host) or host_matches(vs_host, server_host)


def build_gateway_table(ctx: RouteContext, port: int, servers: list[tuple[Any, Any]]) -> RouteTable:
    """Route table ``gateway-<port>``: a virtual host per VirtualService host bound to one of
    the Gateways serving this port, rules of several VirtualServices for one host appended;
    then the virtual hosts of the Gateway API listeners on this port."""
    api_listeners = [s for _, s in servers if gateway_api.is_listener(s)]
    servers = [(gw, s) for gw, s in servers if not gateway_api.is_listener(s)]
    by_host: dict[str, list[Route]] = {}
    order: list[str] = []
    seen: set[tuple[int, str]] = set()
    redirect_hosts: set[str] = set()
    for gw, server in servers:
        gw_ref = f"{gw.namespace}/{gw.name}"
        https_redirect = server.tls is not None and bool(server.tls.https_redirect)
        for vs in ctx.idx.virtual_services:
            if gw_ref not in {_gateway_ref(g, vs.namespace) for g in vs.spec.gateways}:
                continue
            for vs_host in vs.spec.hosts:
                if (id(vs), vs_host) in seen:
                    continue
                if not any(
                    _server_host_matches(h, gw.namespace, vs, vs_host) for h in server.hosts
                ):
                    continue
                seen.add((id(vs), vs_host))
                if https_redirect:
                    redirect_hosts.add(vs_host)
                routes = vs_routes(ctx, vs, port, gateway=gw_ref, default_host=vs_host)
                if vs_host not in by_host:
                    by_host[vs_host] = []
                    order.append(vs_host)
                by_host[vs_host] += routes
        if https_redirect:
            # redirect even without a VirtualService for the server's hosts (Istio does)
            for h in server.hosts:
                host = h.partition("/")[2] if "/" in h else h
                if host not in by_host:
                    by_host[host] = []
                    order.append(host)
                redirect_hosts.add(host)
    vhosts = []
    for host in sorted(order, key=lambda h: (h == "*", h.startswith("*"), order.index(h))):
        domains = (host,) if host == "*" else (host, f"{host}:{port}")
        routes = by_host[host]
        if host in redirect_hosts:
            # Gateway tls.httpsRedirect: every plain HTTP request gets a 301 to https
            routes = [
                Route(name="https-redirect", redirect=Redirect(scheme="https", code=301)),
                *routes,
            ]
        vhosts.append(VirtualHost(name=f"{host}:{port}", domains=domains, routes=tuple(routes)))
    if api_listeners:
        vhosts += gateway_api.gateway_virtual_hosts(ctx, port, api_listeners)
    return RouteTable(name=f"gateway-{port}", virtual_hosts=tuple(vhosts))

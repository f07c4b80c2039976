"""Gateway API -> the snapshot: Gateways become gateway listeners, HTTPRoutes and GRPCRoutes
become routes.

Theory of operation
-------------------
``bind(resources, services)`` runs once per push (``ConfigIndex`` keeps the result). It decides,
as Istio's Gateway API controller does, which HTTPRoute attaches to which parent and whether
its references resolve, and records every decision as a route status condition (``Accepted``,
``ResolvedRefs`` with Gateway API's reasons), which ``diktyo analyze`` reports.

- A parent ``Gateway`` (class ``istio``) is served by diktyo's gateway proxies: a proxy in
  gateway mode whose labels have ``gateway.networking.k8s.io/gateway-name: <name>``, or, when
  no proxy label names a Gateway, ``istio: ingressgateway``. Each HTTP listener's port becomes
  a ``gateway-<port>`` listener and route table, shared with Istio Gateways on that port.
- A parent ``Service`` (GAMMA) makes the route the sidecars' outbound routing for that service
  (and port, when the parentRef has one) in place of any VirtualService for it. A route in
  the service's namespace serves every client (producer route); a route in another namespace
  only clients in that namespace (consumer route), which then wins over producer routes.

Rules are turned into the proxy's own routes (the sidecar knows nothing of the Gateway API):
every match becomes its own route, and all routes for one host are ordered by the Gateway
API precedence Istio implements: Exact path over PathPrefix over RegularExpression, longer
paths first, then a method match, more header matches, more query matches; ties keep the
order of routes (``namespace/name``; files have no creation timestamps) and of their rules.
``PathPrefix /foo`` matches ``/foo`` and ``/foo/...`` but not ``/foobar`` (Envoy's
path-separated prefix), expressed as an exact ``/foo`` and a prefix ``/foo/``.

A GRPCRoute attaches and resolves as an HTTPRoute does (a listener's ``allowedRoutes.kinds``
must admit it when it lists kinds; ReferenceGrants name ``kind: GRPCRoute``). Its method match
becomes a ``:path`` match (gRPC calls post to ``/<service>/<method>``; ``grpc_path_match``) and
its header matches are gRPC metadata, which travels as HTTP/2 headers; its rules are ordered
with the host's HTTPRoute rules by the same keys, a rule without matches last.

Invalid backends get no traffic they could serve: a rule whose backends are all invalid (or
that has none and no redirect) answers 500, as the Gateway API requires.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from diktyo.api.gateway_api import GATEWAY_API
from diktyo.control.model import Service
from diktyo.control.translate.hosts import DOMAIN_SUFFIX, ConfigIndex, host_matches
from diktyo.snapshot.model import (
    DirectResponse,
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
    StringMatch,
    VirtualHost,
    WeightedCluster,
    cluster_name,
)

if TYPE_CHECKING:
    from diktyo.control.translate.routes import RouteContext

GATEWAY_CLASSES = ("istio",)  # the classes diktyo's gateways serve
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
INGRESS_LABELS = {"istio": "ingressgateway"}
HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"
ROUTE_KINDS = (HTTP_ROUTE, GRPC_ROUTE)  # the route kinds an HTTP listener or a Service takes
INVALID_SUFFIX = "gateway-api.invalid"  # hosts of clusters standing for invalid backendRefs

Severity = Literal["error", "warning", "info"]


def _is(res: Any, kind: str) -> bool:
    return getattr(res, "kind", "") == kind and str(getattr(res, "api_version", "")).startswith(
        GATEWAY_API + "/"
    )


@dataclass(frozen=True, slots=True)
class Finding:
    """One status condition (or other remark) about a Gateway API object, for ``analyze``."""

    resource: Any
    path: str
    severity: Severity
    message: str
    hint: str = ""


@dataclass
class ApiListener:
    """A served listener of a Gateway and the routes attached to it (with their hostnames)."""

    gateway: Any
    listener: Any
    index: int
    routes: list[tuple[Any, tuple[str, ...]]] = field(default_factory=list)


@dataclass
class Backend:
    """A resolved backendRef: ``host`` is None when it is invalid (``reason`` says why)."""

    host: str | None
    port: int | None
    weight: int
    reason: str = ""


@dataclass
class GatewayApiIndex:
    listeners: list[ApiListener] = field(default_factory=list)
    # service FQDN -> [(route, parentRef port or None)]
    mesh: dict[str, list[tuple[Any, int | None]]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # id(backendRef model) -> Backend
    backends: dict[int, Backend] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.listeners or self.mesh)


# --------------------------------------------------------------------------- binding


def index_of(idx: ConfigIndex) -> GatewayApiIndex:
    """The Gateway API binding of a config index, computed once per index."""
    if idx.gateway_api is None:
        idx.gateway_api = bind(idx.resources, idx.registry.services)
    bound: GatewayApiIndex = idx.gateway_api
    return bound


def bind(resources: Iterable[Any], services: Iterable[Service] | None) -> GatewayApiIndex:
    """Attach HTTPRoutes to their parents and resolve their backends (``services`` None: the
    registry is unknown, backends are taken as existing)."""
    resources = list(resources)
    gateways = [r for r in resources if _is(r, "Gateway")]
    routes = sorted(
        (r for r in resources if any(_is(r, kind) for kind in ROUTE_KINDS)),
        key=lambda r: (r.namespace, r.name, r.kind),
    )
    grants = [r for r in resources if _is(r, "ReferenceGrant")]
    out = GatewayApiIndex()
    by_host = None if services is None else {s.hostname: s for s in services}
    gw_by_name = {(g.namespace, g.name): g for g in gateways}
    served: dict[tuple[str, str], list[ApiListener]] = {}
    for gw in gateways:
        served[(gw.namespace, gw.name)] = _gateway_listeners(gw, out)
    out.listeners = [lst for lsts in served.values() for lst in lsts]
    for rt in routes:
        _resolve_backends(rt, grants, by_host, out)
        for i, ref in enumerate(rt.spec.parent_refs):
            _attach(rt, i, ref, gw_by_name, served, by_host, out)
    return out


def _gateway_listeners(gw: Any, out: GatewayApiIndex) -> list[ApiListener]:
    cls = gw.spec.gateway_class_name
    if cls not in GATEWAY_CLASSES:
        why = (
            "waypoints (Istio's ambient mode) are not supported by diktyo"
            if cls == "istio-waypoint"
            else "diktyo's gateways serve only gatewayClassName 'istio'"
        )
        out.findings.append(
            Finding(
                gw,
                "spec.gatewayClassName",
                "warning",
                f"gatewayClassName {cls!r}: {why}; Gateway ignored",
                "set gatewayClassName: istio",
            )
        )
        return []
    served = []
    seen: dict[tuple[int, str], str] = {}
    for i, lst in enumerate(gw.spec.listeners):
        path = f"spec.listeners[{i}]"
        if lst.protocol != "HTTP":
            why = (
                "TLS termination at diktyo's gateways is not supported"
                if lst.protocol in ("HTTPS", "TLS")
                else f"protocol {lst.protocol} is not served by diktyo's gateways"
            )
            out.findings.append(
                Finding(
                    gw,
                    f"{path}.protocol",
                    "warning",
                    f"listener {lst.name!r}: Accepted=False (UnsupportedProtocol): {why}; "
                    "listener ignored",
                    "use protocol HTTP",
                )
            )
            continue
        key = (lst.port, lst.hostname or "")
        if key in seen:
            out.findings.append(
                Finding(
                    gw,
                    f"{path}.hostname",
                    "error",
                    f"listener {lst.name!r}: Conflicted=True (HostnameConflict): listener "
                    f"{seen[key]!r} has the same port {lst.port} and hostname "
                    f"{lst.hostname or '(any)'}; listener ignored",
                    "give the listeners different hostnames or ports",
                )
            )
            continue
        seen[key] = lst.name
        if lst.allowed_routes.namespaces.from_ == "Selector":
            out.findings.append(
                Finding(
                    gw,
                    f"{path}.allowedRoutes.namespaces.from",
                    "warning",
                    f"listener {lst.name!r}: namespace selectors need namespace labels, which "
                    "diktyo does not know; only routes in the Gateway's namespace attach",
                    "use from: Same or from: All",
                )
            )
        served.append(ApiListener(gateway=gw, listener=lst, index=i))
    return served


def _parent_kind(ref: Any) -> tuple[str, str]:
    group = GATEWAY_API if ref.group is None else ref.group
    return group, ref.kind or "Gateway"


def _attach(
    rt: Any,
    i: int,
    ref: Any,
    gw_by_name: dict[tuple[str, str], Any],
    served: dict[tuple[str, str], list[ApiListener]],
    by_host: dict[str, Service] | None,
    out: GatewayApiIndex,
) -> None:
    path = f"spec.parentRefs[{i}]"
    ns = ref.namespace or rt.namespace
    group, kind = _parent_kind(ref)

    def refuse(reason: str, message: str, hint: str, severity: Severity = "error") -> None:
        out.findings.append(
            Finding(
                rt,
                path,
                severity,
                f"parentRef {kind} {ns}/{ref.name}: Accepted=False ({reason}): {message}",
                hint,
            )
        )

    if group == "" and kind == "Service":
        host = f"{ref.name}.{ns}.svc.{DOMAIN_SUFFIX}"
        if by_host is not None:
            svc = by_host.get(host)
            if svc is None:
                refuse("NoMatchingParent", f"service {host} not found", "check the name")
                return
            if ref.port is not None and all(p.number != ref.port for p in svc.ports):
                ports = ", ".join(str(p.number) for p in svc.ports)
                refuse(
                    "NoMatchingParent",
                    f"service {host} has no port {ref.port}",
                    f"use one of its ports: {ports}",
                )
                return
        if rt.spec.hostnames:
            out.findings.append(
                Finding(
                    rt,
                    "spec.hostnames",
                    "info",
                    "hostnames are ignored for routes whose parent is a Service",
                    "remove hostnames",
                )
            )
        out.mesh.setdefault(host, []).append((rt, ref.port))
        return
    if (group, kind) != (GATEWAY_API, "Gateway"):
        refuse(
            "UnsupportedValue",
            f"parents of kind {group or 'core'}/{kind} are not supported",
            'use a Gateway (gateway.networking.k8s.io) or a Service (group "")',
        )
        return
    gw = gw_by_name.get((ns, ref.name))
    if gw is None:
        refuse("NoMatchingParent", "Gateway not found", "check the Gateway's name and namespace")
        return
    listeners = served.get((ns, ref.name), [])
    if ref.section_name is not None:
        listeners = [lst for lst in listeners if lst.listener.name == ref.section_name]
        if not listeners and all(x.name != ref.section_name for x in gw.spec.listeners):
            names = ", ".join(x.name for x in gw.spec.listeners)
            refuse(
                "NoMatchingParent",
                f"no listener named {ref.section_name!r}",
                f"use one of: {names}",
            )
            return
    if ref.port is not None:
        listeners = [lst for lst in listeners if lst.listener.port == ref.port]
    if not listeners:
        refuse(
            "NoMatchingParent",
            "no listener of this Gateway that diktyo serves matches the reference",
            "check sectionName and port, and that the listener is HTTP",
        )
        return
    reasons: list[tuple[str, str, str]] = []
    attached = False
    for lst in listeners:
        allowed = lst.listener.allowed_routes
        frm = allowed.namespaces.from_
        if frm != "All" and rt.namespace != gw.namespace:
            reasons.append(
                (
                    "NotAllowedByListeners",
                    (
                        f"listener {lst.listener.name!r} admits routes from "
                        f"{'its own namespace' if frm == 'Same' else 'selected namespaces'} only "
                        f"(allowedRoutes.namespaces.from: {frm}), the route is in {rt.namespace!r}"
                    ),
                    "set allowedRoutes.namespaces.from: All on the listener, or move the route",
                )
            )
            continue
        kinds = allowed.kinds
        if kinds and not any(
            k.kind == rt.kind and (k.group is None or k.group == GATEWAY_API) for k in kinds
        ):
            reasons.append(
                (
                    "NotAllowedByListeners",
                    (
                        f"listener {lst.listener.name!r} does not admit {rt.kind}s "
                        "(allowedRoutes.kinds)"
                    ),
                    f"add {{kind: {rt.kind}}} to allowedRoutes.kinds",
                )
            )
            continue
        hosts = intersect_hostnames(lst.listener.hostname, rt.spec.hostnames)
        if not hosts:
            reasons.append(
                (
                    "NoMatchingListenerHostname",
                    (
                        f"none of the route's hostnames {list(rt.spec.hostnames)} matches listener "
                        f"{lst.listener.name!r} hostname {lst.listener.hostname!r}"
                    ),
                    "make a route hostname match the listener's hostname",
                )
            )
            continue
        lst.routes.append((rt, hosts))
        attached = True
    if not attached:
        reason, message, hint = reasons[0]
        refuse(reason, message, hint)


def intersect_hostnames(listener: str | None, route: Iterable[str]) -> tuple[str, ...]:
    """The hostnames a route serves on a listener (Gateway API's intersection rules)."""
    route = list(route)
    if not route:
        return (listener or "*",)
    if listener is None:
        return tuple(route)
    out: list[str] = []
    for h in route:
        if host_matches(listener, h):
            out.append(h)  # the route's name is the narrower (or equal) one
        elif host_matches(h, listener):
            out.append(listener)
    return tuple(dict.fromkeys(out))


def _grant_allows(grants: list[Any], rt: Any, target_ns: str, kind: str, name: str) -> bool:
    for g in grants:
        if g.namespace != target_ns:
            continue
        if not any(
            f.group == GATEWAY_API and f.kind == rt.kind and f.namespace == rt.namespace
            for f in g.spec.from_
        ):
            continue
        if any(t.group == "" and t.kind == kind and t.name in (None, name) for t in g.spec.to):
            return True
    return False


def _resolve_backends(
    rt: Any, grants: list[Any], by_host: dict[str, Service] | None, out: GatewayApiIndex
) -> None:
    refs: list[tuple[str, Any, int]] = []
    for ri, rule in enumerate(rt.spec.rules):
        for bi, b in enumerate(rule.backend_refs):
            refs.append((f"spec.rules[{ri}].backendRefs[{bi}]", b, b.weight))
        for fi, f in enumerate(rule.filters):
            if f.request_mirror is not None:
                refs.append(
                    (
                        f"spec.rules[{ri}].filters[{fi}].requestMirror.backendRef",
                        f.request_mirror.backend_ref,
                        1,
                    )
                )
    for path, b, weight in refs:
        group = b.group or ""
        kind = b.kind or "Service"
        ns = b.namespace or rt.namespace
        host = f"{b.name}.{ns}.svc.{DOMAIN_SUFFIX}"
        reason = message = hint = ""
        if (group, kind) != ("", "Service"):
            reason, message, hint = (
                "InvalidKind",
                f"backends of kind {group or 'core'}/{kind} are not supported",
                'reference a Service (group "", kind Service)',
            )
        elif ns != rt.namespace and not _grant_allows(grants, rt, ns, "Service", b.name):
            reason, message, hint = (
                "RefNotPermitted",
                (
                    f"no ReferenceGrant in namespace {ns!r} allows {rt.kind}s from "
                    f"{rt.namespace!r} to reference Service {b.name!r}"
                ),
                (
                    f"add a ReferenceGrant in {ns!r} from {{group: {GATEWAY_API}, kind: {rt.kind}, "
                    f'namespace: {rt.namespace}}} to {{group: "", kind: Service}}'
                ),
            )
        elif by_host is not None and host not in by_host:
            reason, message, hint = (
                "BackendNotFound",
                f"service {host} not found",
                "check the backend's name and namespace",
            )
        elif by_host is not None and all(p.number != b.port for p in by_host[host].ports):
            ports = ", ".join(str(p.number) for p in by_host[host].ports)
            reason, message, hint = (
                "BackendNotFound",
                f"service {host} has no port {b.port}",
                f"use one of its ports: {ports}",
            )
        if reason:
            out.backends[id(b)] = Backend(None, b.port, weight, reason)
            out.findings.append(
                Finding(
                    rt,
                    path,
                    "error",
                    f"backendRef {kind} {ns}/{b.name}: ResolvedRefs=False ({reason}): {message}"
                    + ("; requests routed to it fail" if "Mirror" not in path else ""),
                    hint,
                )
            )
        else:
            out.backends[id(b)] = Backend(host, b.port, weight)


# --------------------------------------------------------------------------- proxies


def serves(gw: Any, labels: dict[str, str]) -> bool:
    """Does the gateway proxy with ``labels`` serve the Gateway API Gateway ``gw``?"""
    named = labels.get(GATEWAY_NAME_LABEL)
    if named is not None:
        return bool(named == gw.name)
    return all(labels.get(k) == v for k, v in INGRESS_LABELS.items())


def gateway_servers(ctx: RouteContext) -> dict[int, list[tuple[Any, ApiListener]]]:
    """Listeners this gateway proxy serves: port -> [(gateway, listener)]."""
    out: dict[int, list[tuple[Any, ApiListener]]] = {}
    gidx = index_of(ctx.idx)
    if not gidx:
        return out
    labels = ctx.proxy.node.labels
    for lst in gidx.listeners:
        if serves(lst.gateway, labels):
            out.setdefault(lst.listener.port, []).append((lst.gateway, lst))
    return out


def is_listener(entry: Any) -> bool:
    return isinstance(entry, ApiListener)


def gateway_virtual_hosts(
    ctx: RouteContext, port: int, listeners: list[ApiListener]
) -> list[VirtualHost]:
    """Virtual hosts for the Gateway API listeners on ``port``: one per hostname, the rules of
    every route attached for that hostname in precedence order."""
    by_host: dict[str, list[Any]] = {}
    for lst in listeners:
        for rt, hosts in lst.routes:
            for h in hosts:
                attached = by_host.setdefault(h, [])
                if all(r is not rt for r in attached):
                    attached.append(rt)
    vhosts = []
    for host in sorted(by_host, key=lambda h: (h == "*", h.startswith("*"), h)):
        ordered = sorted(by_host[host], key=lambda r: (r.namespace, r.name))
        routes = _routes(ctx, ordered, port)
        domains = (host,) if host == "*" else (host, f"{host}:{port}")
        vhosts.append(VirtualHost(name=f"{host}:{port}", domains=domains, routes=tuple(routes)))
    return vhosts


def mesh_routes(ctx: RouteContext, svc: Service, port: int) -> list[Route] | None:
    """Routes of the HTTPRoutes whose parent is ``svc`` (on ``port``), None if there are none."""
    gidx = index_of(ctx.idx)
    if not gidx:
        return None
    attached = [rt for rt, p in gidx.mesh.get(svc.hostname, []) if p is None or p == port]
    if not attached:
        return None
    ns = ctx.proxy.node.namespace
    consumer = [rt for rt in attached if rt.namespace != svc.namespace and rt.namespace == ns]
    chosen = consumer or [rt for rt in attached if rt.namespace == svc.namespace]
    if not chosen:
        return None
    return _routes(ctx, chosen, port)


# --------------------------------------------------------------------------- rules -> routes

_RANK = {"Exact": 3, "PathPrefix": 2, "RegularExpression": 1}


def _precedence(m: Any) -> tuple[int, int, int, int, int]:
    """Sort key (ascending = first) of one HTTPRouteMatch, as Istio's sortHTTPRoutes."""
    rank = _RANK[m.path.type]
    value = m.path.value
    if m.path.type == "PathPrefix" and value != "/":
        value = value.rstrip("/")  # "/api/" is the prefix "/api"
    length = len(value)
    return (-rank, -length, 0 if m.method else 1, -len(m.headers), -len(m.query_params))


def _routes(ctx: RouteContext, routes: list[Any], port: int) -> list[Route]:
    entries: list[tuple[tuple[int, ...], int, Route]] = []
    seq = 0
    for rt in routes:
        for ri, rule in enumerate(rt.spec.rules):
            if rt.kind == GRPC_ROUTE:
                for key, r in _grpc_routes(ctx, rt, ri, rule, port):
                    entries.append((key, seq, r))
                    seq += 1
                continue
            for mi, m in enumerate(rule.matches):
                for r in _match_routes(ctx, rt, ri, rule, mi, m, port):
                    entries.append((_precedence(m), seq, r))
                    seq += 1
    entries.sort(key=lambda e: (e[0], e[1]))
    return [r for _, _, r in entries]


def _sm(kind: str, value: str) -> StringMatch:
    return StringMatch(kind="exact" if kind == "Exact" else "regex", value=value)


def _first_by_name(items: Iterable[Any], fold: bool) -> list[Any]:
    seen: set[str] = set()
    out = []
    for it in items:
        key = it.name.lower() if fold else it.name
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out


def _header_matches(headers: Iterable[Any]) -> tuple[KeyMatch, ...]:
    """Header matches of an HTTPRoute or GRPCRoute match (names fold case; the first wins)."""
    return tuple(
        KeyMatch(name=h.name.lower(), match=_sm(h.type, h.value))
        for h in _first_by_name(headers, fold=True)
    )


def _match_routes(
    ctx: RouteContext, rt: Any, ri: int, rule: Any, mi: int, m: Any, port: int
) -> list[Route]:
    headers = _header_matches(m.headers)
    query = tuple(
        KeyMatch(name=q.name, match=_sm(q.type, q.value))
        for q in _first_by_name(m.query_params, fold=False)
    )
    method = StringMatch(kind="exact", value=m.method) if m.method else None
    name = rule.name or ""

    def rm(uri: StringMatch | None) -> RouteMatch:
        return RouteMatch(name=name, uri=uri, method=method, headers=headers, query_params=query)

    path = m.path
    if path is None:
        return [_route(ctx, rt, ri, rule, (rm(None),), None, port)]
    if path.type == "Exact":
        return [
            _route(
                ctx, rt, ri, rule, (rm(StringMatch(kind="exact", value=path.value)),), "exact", port
            )
        ]
    if path.type == "RegularExpression":
        return [
            _route(
                ctx, rt, ri, rule, (rm(StringMatch(kind="regex", value=path.value)),), None, port
            )
        ]
    prefix = path.value.rstrip("/")  # "a trailing '/' is ignored"
    if not prefix:
        return [
            _route(ctx, rt, ri, rule, (rm(StringMatch(kind="prefix", value="/")),), "prefix", port)
        ]
    exact = rm(StringMatch(kind="exact", value=prefix))
    under = rm(StringMatch(kind="prefix", value=prefix + "/"))
    if _prefix_modifier(rule):
        # the path rewrite differs for "/foo" and "/foo/...": two routes, exact first
        return [
            _route(ctx, rt, ri, rule, (exact,), "exact", port),
            _route(ctx, rt, ri, rule, (under,), "prefix", port),
        ]
    return [_route(ctx, rt, ri, rule, (exact, under), "prefix", port)]


# --------------------------------------------------------------------------- GRPCRoute rules

_URI_RANK = {"exact": 3, "prefix": 2, "regex": 1}
_MATCH_ALL_LAST = (2, 0, 0, 0, 0)  # a rule without matches sorts after every match (as Istio)


def grpc_path_match(m: Any) -> StringMatch | None:
    """The ``:path`` match of a GRPCMethodMatch (gRPC calls post to ``/<service>/<method>``),
    as Istio converts it: Exact service and method -> exact path, service only -> prefix
    ``/<service>/``, method only -> regex ``/[^/]+/<method>``; RegularExpression -> a regex of
    the same shape (service only: ``/<service>/.+``)."""
    if m is None:
        return None
    svc, meth = m.service, m.method
    if m.type == "Exact":
        if meth is None:
            return StringMatch(kind="prefix", value=f"/{svc}/")
        if svc is None:
            return StringMatch(kind="regex", value=f"/[^/]+/{meth}")
        return StringMatch(kind="exact", value=f"/{svc}/{meth}")
    if meth is None:
        return StringMatch(kind="regex", value=f"/{svc}/.+")
    if svc is None:
        return StringMatch(kind="regex", value=f"/[^/]+/{meth}")
    return StringMatch(kind="regex", value=f"/{svc}/{meth}")


def _grpc_routes(
    ctx: RouteContext, rt: Any, ri: int, rule: Any, port: int
) -> list[tuple[tuple[int, ...], Route]]:
    """One route per match of a GRPCRoute rule (one matching everything without matches),
    each with its precedence key: Istio sorts GRPCRoute and HTTPRoute rules of a host by the
    same keys (path match kind, its length, header count)."""
    name = rule.name or ""
    if not rule.matches:
        return [(_MATCH_ALL_LAST, _route(ctx, rt, ri, rule, (), None, port))]
    out: list[tuple[tuple[int, ...], Route]] = []
    for m in rule.matches:
        uri = grpc_path_match(m.method)
        headers = _header_matches(m.headers)
        match = RouteMatch(name=name, uri=uri, headers=headers)
        rank = _URI_RANK[uri.kind] if uri is not None else -1
        length = len(uri.value) if uri is not None else 0
        key = (-rank, -length, 1, -len(headers), 0)
        out.append((key, _route(ctx, rt, ri, rule, (match,), None, port)))
    return out


def _prefix_modifier(rule: Any) -> bool:
    for f in rule.filters:
        mod = f.url_rewrite or f.request_redirect
        if mod is not None and mod.path is not None and mod.path.type == "ReplacePrefixMatch":
            return True
    return False


def _header_ops(f: Any) -> HeaderOps:
    return HeaderOps(
        set={h.name: h.value for h in f.set},
        add={h.name: h.value for h in f.add},
        remove=tuple(f.remove),
    )


def _filter_headers(filters: Iterable[Any]) -> Headers | None:
    req = resp = None
    for f in filters:
        if f.request_header_modifier is not None:
            req = _header_ops(f.request_header_modifier)
        if f.response_header_modifier is not None:
            resp = _header_ops(f.response_header_modifier)
    if req is None and resp is None:
        return None
    return Headers(request=req, response=resp)


def _prefix_path(value: str) -> str:
    return value if value.endswith("/") else value + "/"


def _route(
    ctx: RouteContext,
    rt: Any,
    ri: int,
    rule: Any,
    matches: tuple[RouteMatch, ...],
    path_kind: str | None,
    port: int,
) -> Route:
    gidx = index_of(ctx.idx)
    line, _ = rt.position(f"spec.rules[{ri}]")
    source = RouteSource(
        kind=rt.kind,
        name=rt.name,
        namespace=rt.namespace,
        rule=ri,
        rule_name=rule.name or "",
        file=rt.file,
        line=line,
    )
    kw: dict[str, Any] = {"name": rule.name or "", "matches": matches, "source": source}
    headers = _filter_headers(rule.filters)
    if headers is not None:
        kw["headers"] = headers
    if getattr(rule, "timeouts", None) is not None:  # HTTPRoute only
        from diktyo.api.gateway_api import parse_gateway_duration

        if rule.timeouts.request:
            kw["timeout"] = parse_gateway_duration(rule.timeouts.request) or None
        if rule.timeouts.backend_request:
            kw["retries"] = RetryPolicy(
                per_try_timeout=parse_gateway_duration(rule.timeouts.backend_request)
            )
    broken = False
    mirrors = []
    for f in rule.filters:
        if f.type == "ExtensionRef":
            broken = True  # an unresolved custom filter: 500, never skipped
        elif f.request_redirect is not None:
            kw["redirect"] = _redirect(f.request_redirect, path_kind)
        elif f.url_rewrite is not None:
            kw["rewrite"] = _rewrite(f.url_rewrite, path_kind)
        elif f.request_mirror is not None:
            b = gidx.backends.get(id(f.request_mirror.backend_ref))
            if b is None or b.host is None or b.port is None:
                continue
            ctx.needed.add((b.host, b.port, ""))
            pct = 100.0
            if f.request_mirror.percent is not None:
                pct = float(f.request_mirror.percent)
            elif f.request_mirror.fraction is not None:
                fr = f.request_mirror.fraction
                pct = 100.0 * fr.numerator / fr.denominator
            mirrors.append(
                Mirror(
                    cluster=cluster_name(b.port, "", b.host),
                    host=b.host,
                    port=b.port,
                    percentage=pct,
                )
            )
    if mirrors:
        kw["mirrors"] = tuple(mirrors)
    if broken:
        return Route(**{**kw, "direct_response": DirectResponse(status=500)})
    if "redirect" in kw:
        return Route(**kw)
    clusters = []
    for _i, ref in enumerate(rule.backend_refs):
        b = gidx.backends.get(id(ref))
        if b is None or ref.weight == 0:
            continue
        if b.host is None or b.port is None:
            # an empty cluster (no service is named *.invalid, RFC 2606): its share fails
            # with 503 and the snapshot stays valid
            host, bport = (
                f"{ref.name}.{ref.namespace or rt.namespace}.{INVALID_SUFFIX}",
                ref.port or 1,
            )
            ctx.needed.add((host, bport, ""))
            clusters.append(
                WeightedCluster(
                    cluster=cluster_name(bport, "", host), weight=ref.weight, host=host, port=bport
                )
            )
            continue
        ctx.needed.add((b.host, b.port, ""))
        clusters.append(
            WeightedCluster(
                cluster=cluster_name(b.port, "", b.host),
                weight=ref.weight,
                host=b.host,
                port=b.port,
                headers=_filter_headers(ref.filters),
            )
        )
    if not clusters or all(c.host.endswith(INVALID_SUFFIX) for c in clusters):
        # no backend, all weights 0, or all invalid: the Gateway API requires a 500
        return Route(**{**kw, "direct_response": DirectResponse(status=500)})
    return Route(**kw, clusters=tuple(clusters))


_SCHEME_PORTS = {"http": 80, "https": 443}


def _redirect(rr: Any, path_kind: str | None) -> Redirect:
    uri = prefix = None
    if rr.path is not None:
        if rr.path.type == "ReplaceFullPath":
            uri = rr.path.replace_full_path
        elif path_kind == "prefix":
            prefix = _prefix_path(rr.path.replace_prefix_match or "/")
        else:
            uri = rr.path.replace_prefix_match
    port = rr.port
    if port is None and rr.scheme is not None:
        port = _SCHEME_PORTS[rr.scheme]  # the Gateway API: the scheme's well-known port
    return Redirect(
        uri=uri,
        authority=rr.hostname,
        scheme=rr.scheme,
        port=port,
        code=rr.status_code,
        prefix_rewrite=prefix,
    )


def _rewrite(rw: Any, path_kind: str | None) -> Rewrite:
    kw: dict[str, Any] = {"authority": rw.hostname}
    if rw.path is not None:
        if rw.path.type == "ReplaceFullPath":
            kw["uri_regex"] = "^.*$"
            kw["uri_regex_rewrite"] = re.sub(r"\\", r"\\\\", rw.path.replace_full_path or "")
        elif path_kind == "prefix":
            kw["uri"] = _prefix_path(rw.path.replace_prefix_match or "/")
        else:
            kw["uri"] = rw.path.replace_prefix_match or "/"
    return Rewrite(**kw)

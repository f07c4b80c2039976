"""Route matching: a RouteTable compiled into dict lookups and precompiled regexes (sans-I/O).

Theory of operation
-------------------
``RouteMatcher(table)`` compiles once per snapshot. ``select(info)`` (and ``match_request``, the
same walk for the proxy's hot path) finds the virtual host by
the request's authority (exact domain, then the host without its port, then suffix wildcards
``*.example.com`` longest first, then prefix wildcards ``foo.*``, then ``*``), then walks its
routes in order: first match wins. A route's match blocks are ORed, the conditions inside one
block are ANDed; a route without match blocks matches everything. Regexes are full matches
(Envoy's RE2 semantics). ``explain(info)`` runs the same compiled conditions and reports, for
each route tried before the winner, the first condition that failed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from diktyo.core.regex import LazyRegex, check_all
from diktyo.snapshot.model import (
    HeaderOps,
    KeyMatch,
    Route,
    RouteMatch,
    RouteTable,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)


class RequestInfo:
    """What routing looks at. ``path`` includes the query string; ``headers`` lower-case names."""

    __slots__ = ("_query", "authority", "bare_path", "headers", "method", "path", "port", "scheme")

    def __init__(
        self,
        method: str,
        path: str,
        authority: str,
        headers: dict[str, str],
        scheme: str = "http",
        port: int | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.scheme = scheme
        self.headers = headers
        self.port = port
        self._query: dict[str, str] | None = None
        i = path.find("?")
        self.bare_path = path if i < 0 else path[:i]  # the path without its query string

    @property
    def query(self) -> dict[str, str]:
        q = self._query
        if q is None:
            i = self.path.find("?")
            if i < 0:
                q = {}
            else:  # urllib.parse (+ ipaddress) loads with the first query match (issue 11, RSS)
                from urllib.parse import parse_qsl

                q = dict(parse_qsl(self.path[i + 1 :], keep_blank_values=True))
            self._query = q
        return q


Cond = Callable[[RequestInfo], bool]


def _regex(pattern: str, rxs: list[LazyRegex], ignore_case: bool = False) -> LazyRegex:
    """A regex compiled on its first use (RE2 stays out of a sidecar until a request needs
    it, issue 11); ``rxs`` collects it for the validation ``RouteMatcher`` runs up front."""
    rx = LazyRegex(pattern, ignore_case=ignore_case)
    rxs.append(rx)
    return rx


def _string_pred(
    sm: StringMatch, rxs: list[LazyRegex], ignore_case: bool = False
) -> Callable[[str], bool]:
    v = sm.value
    if sm.kind == "present":
        return lambda s: True
    if sm.kind == "exact":
        if ignore_case:
            lv = v.lower()
            return lambda s: s.lower() == lv
        return lambda s: s == v
    if sm.kind == "prefix":
        if ignore_case:
            lv = v.lower()
            return lambda s: s.lower().startswith(lv)
        return lambda s: s.startswith(v)
    rx = _regex(v, rxs, ignore_case)
    return lambda s: rx.fullmatch(s) is not None


def _uri_cond(sm: StringMatch, ignore_case: bool, rxs: list[LazyRegex]) -> Cond:
    """A uri condition as one closure over ``info.bare_path`` (one Python call per check)."""
    v = sm.value
    if sm.kind == "present":
        return lambda i: True
    if sm.kind == "exact":
        if ignore_case:
            lv = v.lower()
            return lambda i: i.bare_path.lower() == lv
        return lambda i: i.bare_path == v
    if sm.kind == "prefix":
        if ignore_case:
            lv = v.lower()
            return lambda i: i.bare_path.lower().startswith(lv)
        return lambda i: i.bare_path.startswith(v)
    rx = _regex(v, rxs, ignore_case)
    return lambda i: rx.fullmatch(i.bare_path) is not None


def _header_cond(sm: StringMatch, name: str, rxs: list[LazyRegex]) -> Cond:
    """A positive header condition as one closure (one Python call per check)."""
    v = sm.value
    if sm.kind == "present":
        return lambda i: name in i.headers
    if sm.kind == "exact":
        return lambda i: i.headers.get(name) == v  # a missing header (None) never equals v
    if sm.kind == "prefix":

        def prefix_cond(i: RequestInfo) -> bool:
            val = i.headers.get(name)
            return val is not None and val.startswith(v)

        return prefix_cond
    rx = _regex(v, rxs)

    def regex_cond(i: RequestInfo) -> bool:
        val = i.headers.get(name)
        return val is not None and rx.fullmatch(val) is not None

    return regex_cond


def _describe(what: str, sm: StringMatch) -> str:
    if sm.kind == "present":
        return f"{what} present"
    return f"{what} {sm.kind} {sm.value!r}"


def _key_cond(km: KeyMatch, source: str, negate: bool, rxs: list[LazyRegex]) -> tuple[str, Cond]:
    name = km.name
    label = f"{source} {name!r}: " + _describe("value", km.match)
    if source == "header" and not negate:
        return label, _header_cond(km.match, name, rxs)
    pred = _string_pred(km.match, rxs)
    if source == "header":

        def get(info: RequestInfo) -> str | None:
            return info.headers.get(name)
    else:

        def get(info: RequestInfo) -> str | None:
            return info.query.get(name)

    if negate:

        def cond(info: RequestInfo) -> bool:
            val = get(info)
            return val is None or not pred(val)

        return "without " + label, cond

    def cond_pos(info: RequestInfo) -> bool:
        val = get(info)
        return val is not None and pred(val)

    return label, cond_pos


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _authority_port(authority: str) -> int | None:
    i = authority.rfind(":")
    if i > 0 and authority[i + 1 :].isdigit() and "]" not in authority[i:]:
        return int(authority[i + 1 :])
    return None


def compile_match(m: RouteMatch, rxs: list[LazyRegex]) -> list[tuple[str, Cond]]:
    """One match block -> ordered (description, condition) pairs, all must hold; its regexes
    (not compiled yet) are appended to ``rxs``."""
    conds: list[tuple[str, Cond]] = []
    if m.uri is not None:
        conds.append((_describe("uri", m.uri), _uri_cond(m.uri, m.ignore_uri_case, rxs)))
    if m.scheme is not None:
        pred = _string_pred(m.scheme, rxs)
        conds.append((_describe("scheme", m.scheme), lambda i, p=pred: p(i.scheme)))
    if m.method is not None:
        pred = _string_pred(m.method, rxs)
        conds.append((_describe("method", m.method), lambda i, p=pred: p(i.method)))
    if m.authority is not None:
        pred = _string_pred(m.authority, rxs)
        conds.append((_describe("authority", m.authority), lambda i, p=pred: p(i.authority)))
    if m.port is not None:
        port = m.port

        def port_cond(info: RequestInfo) -> bool:
            # Istio: the port the request is addressed to - the listener's service/server port
            # when known, else the authority's port, else the scheme's default (80/443)
            p = info.port or _authority_port(info.authority)
            return (p or _DEFAULT_PORTS.get(info.scheme, 80)) == port

        conds.append((f"port {port}", port_cond))
    for km in m.headers:
        conds.append(_key_cond(km, "header", False, rxs))
    for km in m.without_headers:
        conds.append(_key_cond(km, "header", True, rxs))
    for km in m.query_params:
        conds.append(_key_cond(km, "query", False, rxs))
    return conds


class CompiledHeaderOps:
    """HeaderOps with names lower-cased once."""

    __slots__ = ("add", "remove", "set")

    def __init__(self, ops: HeaderOps | None) -> None:
        self.set: list[tuple[str, str]] = []
        self.add: list[tuple[str, str]] = []
        self.remove: list[str] = []
        if ops is not None:
            self.set = [(k.lower(), v) for k, v in ops.set.items()]
            self.add = [(k.lower(), v) for k, v in ops.add.items()]
            self.remove = [k.lower() for k in ops.remove]

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply_request(self, headers: dict[str, str]) -> None:
        for k in self.remove:
            headers.pop(k, None)
        for k, v in self.set:
            headers[k] = v
        for k, v in self.add:
            old = headers.get(k)
            headers[k] = v if old is None else old + "," + v

    def apply_response(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = {k.encode("latin-1") for k in self.remove}
        drop.update(k.encode("latin-1") for k, _ in self.set)
        if drop:
            headers = [(n, v) for n, v in headers if n.lower() not in drop]
        for k, v in self.set:
            headers.append((k.encode("latin-1"), v.encode("latin-1")))
        for k, v in self.add:
            headers.append((k.encode("latin-1"), v.encode("latin-1")))
        return headers


def _ops(ops: HeaderOps | None) -> CompiledHeaderOps | None:
    """Compiled header operations, or None when there are none (a cheap test per request)."""
    c = CompiledHeaderOps(ops)
    return c if c else None


class CompiledDestination:
    __slots__ = ("cluster", "req_ops", "resp_ops", "wc")

    def __init__(self, wc: WeightedCluster) -> None:
        self.wc = wc
        self.cluster = wc.cluster  # read per request: a native field (compiled), not wc's
        h = wc.headers
        self.req_ops = _ops(h.request if h else None)
        self.resp_ops = _ops(h.response if h else None)


class CompiledRoute:
    """A Route plus everything precomputed for the hot path."""

    __slots__ = (
        "blocks",
        "cum_weights",
        "dests",
        "extra",
        "has_mirrors",
        "has_rewrite",
        "index",
        "req_ops",
        "resp_ops",
        "retries",
        "route",
        "terminal",
        "timeout",
        "total_weight",
        "uri_regex",
        "weighted",
    )

    def __init__(self, route: Route, index: int, rxs: list[LazyRegex]) -> None:
        self.route = route
        self.index = index
        self.blocks = [compile_match(m, rxs) for m in route.matches]
        self.dests = [CompiledDestination(wc) for wc in route.clusters]
        cum: list[int] = []
        total = 0
        for wc in route.clusters:
            total += max(0, wc.weight)
            cum.append(total)
        self.cum_weights = cum
        self.total_weight = total
        # (destination, cumulative weight) pairs, built once: pick walks them without a zip
        self.weighted = list(zip(self.dests, cum, strict=True))
        h = route.headers
        self.req_ops = _ops(h.request if h else None)
        self.resp_ops = _ops(h.response if h else None)
        rw = route.rewrite
        self.uri_regex = _regex(rw.uri_regex, rxs) if rw is not None and rw.uri_regex else None
        self.has_rewrite = rw is not None
        # the route's fields the stream reads per request, copied here once: compiled, they
        # are native attribute reads (the snapshot model's are dictionary lookups)
        self.terminal = route.direct_response is not None or route.redirect is not None
        self.has_mirrors = bool(route.mirrors)
        self.timeout = route.timeout
        self.retries = route.retries
        self.extra: dict[str, Any] = {}  # per-route caches owned by the proxy

    def why_not(self, info: RequestInfo) -> list[str]:
        """For each match block, the first condition that failed."""
        out = []
        for bi, conds in enumerate(self.blocks):
            for desc, cond in conds:
                if not cond(info):
                    name = self.route.matches[bi].name
                    out.append(
                        f"match[{bi}]{' ' + repr(name) if name else ''}: {desc} did not match"
                    )
                    break
        return out

    def pick(self, rng: random.Random) -> CompiledDestination | None:
        dests = self.dests
        if not dests:
            return None
        if len(dests) == 1:
            return dests[0]
        total = self.total_weight
        if total <= 0:
            return dests[0]
        r = int(rng.random() * total)  # one C call (randrange costs ~5 calls in Python)
        for d, cw in self.weighted:
            if r < cw:
                return d
        return dests[-1]

    def rewrite_path(self, path: str, block: int) -> str:
        """Apply ``rewrite.uri`` / ``uriRegexRewrite`` to ``path`` (query string kept)."""
        rw = self.route.rewrite
        if rw is None:
            return path
        q = path.find("?")
        bare, query = (path, "") if q < 0 else (path[:q], path[q:])
        if self.uri_regex is not None:
            repl = re.sub(r"\\(\d)", r"\\g<\1>", rw.uri_regex_rewrite or "")
            bare = self.uri_regex.sub(repl, bare)
        elif rw.uri is not None:
            return self.rewrite_prefix(path, block, rw.uri)
        return bare + query

    def rewrite_prefix(self, path: str, block: int, new: str) -> str:
        """``path`` with the uri prefix matched by match block ``block`` replaced by ``new``
        (the whole path when that match is not a prefix match); the query string is kept."""
        q = path.find("?")
        bare, query = (path, "") if q < 0 else (path[:q], path[q:])
        m = self.route.matches[block] if self.route.matches else None
        if m is not None and m.uri is not None and m.uri.kind == "prefix":
            rest = bare[len(m.uri.value) :]
            if new.endswith("/") and rest.startswith("/"):
                rest = rest[1:]
            bare = new + rest or "/"
        else:
            bare = new
        return bare + query


class CompiledVirtualHost:
    __slots__ = ("blocks", "regexes", "routes", "vh")

    def __init__(self, vh: VirtualHost) -> None:
        self.vh = vh
        # its regexes, compiled on first use; RouteMatcher validates them when it is built
        self.regexes: list[LazyRegex] = []
        self.routes = [CompiledRoute(r, i, self.regexes) for i, r in enumerate(vh.routes)]
        # every (route, match block index, conditions) in evaluation order, so the hot path
        # walks one flat list instead of calling CompiledRoute.match per route (same result:
        # first route whose first holding block wins; a route without blocks matches all)
        self.blocks: list[tuple[CompiledRoute, int, tuple[Cond, ...]]] = [
            (cr, bi, tuple(cond for _, cond in conds))
            for cr in self.routes
            for bi, conds in (enumerate(cr.blocks) if cr.blocks else [(0, [])])
        ]


MAX_AUTHORITY_CACHE = 1024  # distinct authorities remembered per route table


class RouteMatcher:
    """A compiled RouteTable. Raises ValueError (bad regex) when built, never per request.

    Its regexes are validated when it is built but compiled on their first use, so a sidecar
    whose requests never reach a regex never loads RE2 (issue 11, idle RSS).
    ``check=False`` leaves the validation to the caller: :meth:`check` (the sidecar validates
    the regexes of all a snapshot's route tables at once, ``diktyo.core.regex.check_all``).
    """

    __slots__ = ("by_authority", "catch_all", "exact", "prefixes", "suffixes", "table", "vhosts")

    def __init__(self, table: RouteTable, check: bool = True) -> None:
        self.table = table
        self.exact: dict[str, CompiledVirtualHost] = {}
        # authority as received -> virtual host, filled by find_virtual_host (the hot path
        # reads it directly: one dict lookup per request instead of a call)
        self.by_authority: dict[str, CompiledVirtualHost] = {}
        suffixes: list[tuple[str, CompiledVirtualHost]] = []
        prefixes: list[tuple[str, CompiledVirtualHost]] = []
        self.catch_all: CompiledVirtualHost | None = None
        self.vhosts: list[CompiledVirtualHost] = []
        for vh in table.virtual_hosts:
            cvh = CompiledVirtualHost(vh)
            self.vhosts.append(cvh)
            for d in vh.domains:
                d = d.lower()
                if d == "*":
                    if self.catch_all is None:
                        self.catch_all = cvh
                elif d.startswith("*"):
                    suffixes.append((d[1:], cvh))
                elif d.endswith("*"):
                    prefixes.append((d[:-1], cvh))
                else:
                    self.exact.setdefault(d, cvh)
        suffixes.sort(key=lambda p: -len(p[0]))
        prefixes.sort(key=lambda p: -len(p[0]))
        self.suffixes = suffixes
        self.prefixes = prefixes
        if check:
            self.check()

    def regexes(self) -> list[LazyRegex]:
        """Every regex of the table (compiled or not), in evaluation order."""
        return [rx for cvh in self.vhosts for rx in cvh.regexes]

    def check(self) -> None:
        """Raise ValueError naming the virtual host of the first regex RE2 cannot compile."""
        verdicts = check_all(self.regexes())
        for cvh in self.vhosts:
            for rx in cvh.regexes:
                err = verdicts.get(rx.key, "")
                if err:
                    raise ValueError(f"virtual host {cvh.vh.name!r}: invalid regex: {err}")

    def find_virtual_host(self, authority: str) -> CompiledVirtualHost | None:
        cvh = self.by_authority.get(authority)
        if cvh is None:
            cvh = self._find_virtual_host(authority)
            if cvh is not None and len(self.by_authority) < MAX_AUTHORITY_CACHE:
                self.by_authority[authority] = cvh
        return cvh

    def _find_virtual_host(self, authority: str) -> CompiledVirtualHost | None:
        a = authority.lower()
        cvh = self.exact.get(a)
        if cvh is not None:
            return cvh
        i = a.rfind(":")
        if i > 0 and "]" not in a[i:]:
            cvh = self.exact.get(a[:i])
            if cvh is not None:
                return cvh
        for suffix, cvh in self.suffixes:
            if a.endswith(suffix):
                return cvh
        for prefix, cvh in self.prefixes:
            if a.startswith(prefix):
                return cvh
        return self.catch_all

    def select(self, info: RequestInfo) -> tuple[CompiledVirtualHost, CompiledRoute, int] | None:
        """(virtual host, route, index of the match block that held) or None (404 NR)."""
        cvh = self.by_authority.get(info.authority) or self.find_virtual_host(info.authority)
        if cvh is None:
            return None
        found = _first_match(cvh, info)
        return None if found is None else (cvh, found[0], found[1])

    def match_request(
        self,
        method: str,
        path: str,
        authority: str,
        headers: dict[str, str],
        scheme: str,
        port: int | None,
    ) -> tuple[CompiledRoute, int] | None:
        """``select`` for the proxy's hot path: (route, match block index) or None (404 NR).
        A virtual host whose first route matches everything needs no ``RequestInfo``."""
        cvh = self.by_authority.get(authority) or self.find_virtual_host(authority)
        if cvh is None:
            return None
        routes = cvh.routes
        if routes and not routes[0].blocks:
            return routes[0], 0
        info = RequestInfo(method, path, authority, headers, scheme, port)
        for cr, bi, conds in cvh.blocks:  # _first_match inlined (hot path: one call less)
            for cond in conds:
                if not cond(info):
                    break
            else:
                return cr, bi
        return None


def _first_match(cvh: CompiledVirtualHost, info: RequestInfo) -> tuple[CompiledRoute, int] | None:
    """The first route (in order) with a match block whose conditions all hold: one walk over
    the virtual host's flat (route, block, conditions) list, no call per route."""
    for cr, bi, conds in cvh.blocks:
        for cond in conds:
            if not cond(info):
                break
        else:
            return cr, bi
    return None

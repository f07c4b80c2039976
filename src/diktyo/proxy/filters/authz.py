"""AuthorizationPolicy enforcement (Envoy's RBAC filter as Istio configures it), pure code.

Theory of operation
-------------------
``AuthzEngine(policies)`` compiles the policies of one workload once (snapshot load) into
predicates; ``check(attrs)`` evaluates one request in Istio's order:

1. CUSTOM policies are skipped (diktyo has no ext_authz; ``Decision.reason`` never cites them).
2. Any matching DENY policy denies.
3. If the workload has no ALLOW policy, the request is allowed.
4. Otherwise it is allowed only if an ALLOW policy matches. An ALLOW policy without rules
   (``spec: {}``) matches nothing, so it denies everything; ``rules: [{}]`` allows all.
5. AUDIT policies never change the decision; matching ones are listed in ``Decision.audit``.

A rule matches when any ``from`` source matches (or there is none), any ``to`` operation
matches (or there is none) and every ``when`` condition holds. Inside a source/operation all
set fields must match; a ``notX`` field matches when none of its values match.

Value syntax (Istio): ``*`` = any non-empty value, ``prefix*``, ``*suffix``, exact. Paths also
accept ``{*}`` (one segment) and ``{**}`` (any rest). Hosts are case-insensitive and match with
or without the ``:port``. Principals are compared without the ``spiffe://`` prefix.
Paths must already be normalised (``diktyo.security.pathnorm``); the query is ignored.

A denied request gets 403 with body ``RBAC: access denied``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.core.regex import compile_re2
from diktyo.proxy.filters.jwt_authn import UNAUTHORIZED_STATUS, Fetcher, JwtAuthenticator, JwtResult
from diktyo.proxy.network.tls import xfcc_value
from diktyo.security.pathnorm import PathRejected, normalize_path
from diktyo.security.spiffe import namespace_of, to_principal
from diktyo.snapshot.security import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    Operation,
    SecurityConfig,
    Source,
)

DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"

Pred = Callable[["RequestAttributes"], bool]
Match = Callable[[str], bool]


@dataclass(slots=True)
class RequestAttributes:
    """What the policies may look at for one request (filled by the inbound listener)."""

    method: str = "GET"
    path: str = "/"  # normalised; a query part is ignored
    host: str = ""  # Host / :authority
    port: int = 0  # destination (service/app) port
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    source_principal: str = ""  # peer SPIFFE id from mTLS ("" without mTLS)
    source_ip: str = ""  # direct peer address
    remote_ip: str = ""  # original client (X-Forwarded-For); "" = source_ip
    destination_ip: str = ""
    request_principal: str = ""  # "iss/sub" from a validated JWT
    claims: Mapping[str, Any] = field(default_factory=dict)  # validated JWT claims
    sni: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str  # "namespace/name" of the deciding policy, "" when none
    reason: str
    audit: tuple[str, ...] = ()


# --------------------------------------------------------------------------- value matchers


def _value_matcher(pattern: str, *, fold: bool = False) -> Match:
    if fold:
        pattern = pattern.lower()
    if pattern == "*":
        return lambda v: v != ""
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda v: v.endswith(suffix)
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda v: v.startswith(prefix)
    return lambda v: v == pattern


def _path_matcher(pattern: str) -> Match:
    if "{*}" in pattern or "{**}" in pattern:
        parts = re.split(r"(\{\*\*\}|\{\*\})", pattern)
        rx = "".join(
            "[^/]+" if p == "{*}" else ".*" if p == "{**}" else re.escape(p) for p in parts
        )
        compiled = compile_re2(rx, max_program_size=0)  # built from escaped literals
        return lambda v: compiled.fullmatch(v) is not None
    return _value_matcher(pattern)


def _any(patterns: Sequence[str], make: Callable[[str], Match] = _value_matcher) -> Match | None:
    """One matcher for a list: exact values by set lookup, prefixes/suffixes by one call each."""
    if not patterns:
        return None
    if make is not _value_matcher:
        ms = tuple(make(p) for p in patterns)
        return lambda v: any(m(v) for m in ms)
    presence = "*" in patterns
    exact = frozenset(p for p in patterns if "*" not in p)
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("*") and not p.startswith("*"))
    suffixes = tuple(p[1:] for p in patterns if p.startswith("*") and p != "*")

    def match(v: str) -> bool:
        if v in exact:
            return True
        if presence and v:
            return True
        return bool((prefixes and v.startswith(prefixes)) or (suffixes and v.endswith(suffixes)))

    return match


def _paths_any(patterns: Sequence[str]) -> Match | None:
    plain = [p for p in patterns if "{*}" not in p and "{**}" not in p]
    templ = [p for p in patterns if p not in plain]
    m1 = _any(plain)
    m2 = _any(templ, _path_matcher)
    if m2 is None:
        return m1
    if m1 is None:
        return m2
    return lambda v: m1(v) or m2(v)


@lru_cache(maxsize=4096)
def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None


def _ip_matcher(blocks: Sequence[str]) -> Callable[[str], bool] | None:
    if not blocks:
        return None
    nets = tuple(ipaddress.ip_network(b.strip(), strict=False) for b in blocks)

    def match(ip: str) -> bool:
        addr = _parse_ip(ip) if ip else None
        if addr is None:
            return False
        return any(addr in n for n in nets if n.version == addr.version)

    return match


def _field(
    getter: Callable[[RequestAttributes], str], yes: Match | None, no: Match | None
) -> Pred | None:
    if yes is None and no is None:
        return None
    if no is None:
        assert yes is not None
        return lambda a: yes(getter(a))
    if yes is None:
        return lambda a: not no(getter(a))
    return lambda a: (v := getter(a)) is not None and yes(v) and not no(v)


def _all(preds: Sequence[Pred | None]) -> Pred:
    ps = tuple(p for p in preds if p is not None)
    if not ps:
        return lambda a: True
    if len(ps) == 1:
        return ps[0]
    return lambda a: all(p(a) for p in ps)


# --------------------------------------------------------------------------- attribute getters


def _principal(a: RequestAttributes) -> str:
    return to_principal(a.source_principal)


def _namespace(a: RequestAttributes) -> str:
    return namespace_of(a.source_principal) if a.source_principal else ""


def _service_account(a: RequestAttributes) -> str:
    p = _principal(a).split("/")
    return f"{p[2]}/{p[4]}" if len(p) == 5 and p[1] == "ns" and p[3] == "sa" else ""


def _trust_domain(a: RequestAttributes) -> str:
    return _principal(a).split("/", 1)[0] if a.source_principal else ""


def _remote_ip(a: RequestAttributes) -> str:
    return a.remote_ip or a.source_ip


def _host_any(patterns: Sequence[str]) -> Match | None:
    m = _any([p.lower() for p in patterns])
    if m is None:
        return None

    def match(host: str) -> bool:
        h = host.lower()
        if m(h):
            return True
        bare = h.rsplit(":", 1)[0] if ":" in h and not h.endswith("]") else h
        return bare != h and m(bare)

    return match


def _compile_source(s: Source) -> Pred:
    ip = _ip_matcher
    return _all(
        [
            _field(
                _principal,
                _any([to_principal(p) for p in s.principals]),
                _any([to_principal(p) for p in s.not_principals]),
            ),
            _field(
                lambda a: a.request_principal,
                _any(s.request_principals),
                _any(s.not_request_principals),
            ),
            _field(_namespace, _any(s.namespaces), _any(s.not_namespaces)),
            _field(_service_account, _any(s.service_accounts), _any(s.not_service_accounts)),
            _field(_trust_domain, _any(s.trust_domains), _any(s.not_trust_domains)),
            _field(lambda a: a.source_ip, ip(s.ip_blocks), ip(s.not_ip_blocks)),
            _field(_remote_ip, ip(s.remote_ip_blocks), ip(s.not_remote_ip_blocks)),
        ]
    )


def _path_only(a: RequestAttributes) -> str:
    q = a.path.find("?")
    return a.path if q < 0 else a.path[:q]


def _compile_operation(o: Operation) -> Pred:

    def exact(ps: frozenset[str]) -> Match | None:
        return (lambda v: v in ps) if ps else None

    return _all(
        [
            _field(lambda a: a.host, _host_any(o.hosts), _host_any(o.not_hosts)),
            _field(lambda a: str(a.port), exact(frozenset(o.ports)), exact(frozenset(o.not_ports))),
            _field(lambda a: a.method, _any(o.methods), _any(o.not_methods)),
            _field(_path_only, _paths_any(o.paths), _paths_any(o.not_paths)),
        ]
    )


_KEY_RX = re.compile(r"^([a-z.]+)((?:\[[^\]]*\])*)$")


def _claim_values(a: RequestAttributes, path: Sequence[str]) -> list[str]:
    cur: Any = a.claims
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur:
            return []
        cur = cur[k]
    if isinstance(cur, list):
        return [str(x) for x in cur if isinstance(x, (str, int, float, bool))]
    if isinstance(cur, (str, int, float, bool)):
        return [str(cur).lower() if isinstance(cur, bool) else str(cur)]
    return []


def condition_getter(key: str) -> Callable[[RequestAttributes], list[str]]:
    """Values of a ``when`` key for a request (a list: claims may hold several)."""
    m = _KEY_RX.match(key.strip())
    if not m:
        raise ValueError(f"unsupported condition key {key!r}")
    base, subs = m.group(1), re.findall(r"\[([^\]]*)\]", m.group(2))
    if base == "request.headers" and len(subs) == 1:
        name = subs[0].lower()
        return lambda a: [a.headers[name]] if name in a.headers else []
    if base == "request.auth.claims" and subs:
        return lambda a: _claim_values(a, subs)
    if subs:
        raise ValueError(f"unsupported condition key {key!r}")
    simple: dict[str, Callable[[RequestAttributes], str]] = {
        "source.principal": _principal,
        "source.namespace": _namespace,
        "source.serviceaccount": _service_account,
        "request.auth.principal": lambda a: a.request_principal,
        "request.auth.presenter": lambda a: str(a.claims.get("azp", "")),
        "destination.port": lambda a: str(a.port),
        "connection.sni": lambda a: a.sni,
    }
    if base == "request.auth.audiences":
        return lambda a: _claim_values(a, ["aud"])
    if base in simple:
        g = simple[base]
        return lambda a: [v] if (v := g(a)) else []
    raise ValueError(f"unsupported condition key {key!r}")


def _compile_condition(c: Condition) -> Pred:
    key = c.key.strip()
    if key in ("source.ip", "remote.ip", "destination.ip"):
        getter = {
            "source.ip": lambda a: a.source_ip,
            "remote.ip": _remote_ip,
            "destination.ip": lambda a: a.destination_ip,
        }[key]
        p = _field(getter, _ip_matcher(c.values), _ip_matcher(c.not_values))
        return p or (lambda a: True)
    try:
        values_of = condition_getter(key)
    except ValueError:
        return lambda a: False  # unknown keys never match (validate reports them)
    yes = _any(c.values)
    no = _any(c.not_values)

    def pred(a: RequestAttributes) -> bool:
        vals = values_of(a)
        if yes is not None and not any(yes(v) for v in vals):
            return False
        return not (no is not None and any(no(v) for v in vals))

    return pred


def compile_rule(rule: AuthzRule) -> Pred:
    srcs = tuple(_compile_source(s) for s in rule.sources)
    ops = tuple(_compile_operation(o) for o in rule.operations)
    conds = tuple(_compile_condition(c) for c in rule.conditions)
    preds: list[Pred | None] = [
        (lambda a: any(s(a) for s in srcs)) if srcs else None,
        (lambda a: any(o(a) for o in ops)) if ops else None,
        *conds,
    ]
    return _all(preds)


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class _Compiled:
    key: str
    rules: tuple[Pred, ...]

    def first_match(self, a: RequestAttributes) -> int:
        for i, r in enumerate(self.rules):
            if r(a):
                return i
        return -1


class AuthzEngine:
    """Compiled authorization policies of one workload; ``check`` is pure and cheap."""

    __slots__ = ("allow", "audit", "custom", "deny")

    def __init__(self, policies: Sequence[AuthzPolicy]) -> None:
        by_action: dict[str, list[_Compiled]] = {"ALLOW": [], "DENY": [], "AUDIT": [], "CUSTOM": []}
        for p in policies:
            comp = _Compiled(f"{p.namespace}/{p.name}", tuple(compile_rule(r) for r in p.rules))
            by_action[p.action].append(comp)
        self.deny = tuple(by_action["DENY"])
        self.allow = tuple(by_action["ALLOW"])
        self.audit = tuple(by_action["AUDIT"])
        self.custom = tuple(by_action["CUSTOM"])

    @property
    def enabled(self) -> bool:
        """False when no policy can deny: the filter may then be skipped entirely."""
        return bool(self.deny or self.allow)

    def check(self, attrs: RequestAttributes) -> Decision:
        audit = tuple(p.key for p in self.audit if p.first_match(attrs) >= 0) if self.audit else ()
        for p in self.deny:
            i = p.first_match(attrs)
            if i >= 0:
                return Decision(False, p.key, f"denied by DENY policy {p.key} rule {i}", audit)
        if not self.allow:
            return Decision(True, "", "no ALLOW policy applies to this workload", audit)
        for p in self.allow:
            i = p.first_match(attrs)
            if i >= 0:
                return Decision(True, p.key, f"allowed by ALLOW policy {p.key} rule {i}", audit)
        names = ", ".join(p.key for p in self.allow)
        return Decision(False, "", f"no ALLOW policy matched (checked {names})", audit)


# --------------------------------------------------------------------------- inbound composition


@dataclass(frozen=True, slots=True)
class InboundVerdict:
    """What the inbound listener does with one request after the security filters.

    ``status == 0``: continue, forwarding ``path`` (normalised) with ``set_headers`` set and
    ``remove_headers`` removed. Otherwise answer locally with ``status`` and ``body``.
    ``details`` follows Envoy's response code details (for access logs).
    """

    status: int
    body: bytes = b""
    details: str = ""
    path: str = ""
    request_principal: str = ""
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    decision: Decision | None = None


class InboundSecurity:
    """Path normalisation -> JWT (RequestAuthentication) -> RBAC (AuthorizationPolicy).

    Built once per snapshot from ``snapshot.security``; ``check`` is synchronous and returns
    None only when a remote JWKS must be fetched first (then await ``check_async``; call
    ``prefetch()`` at snapshot load so that never happens on the hot path).
    """

    __slots__ = ("_xfcc_last", "authz", "jwt", "local_id", "mode")

    def __init__(
        self,
        config: SecurityConfig,
        *,
        local_spiffe_id: str = "",
        fetcher: Fetcher | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.authz = AuthzEngine(config.authz)
        self.jwt = JwtAuthenticator(config.jwt_rules, fetcher=fetcher, clock=clock)
        self.mode = config.path_normalization
        self.local_id = local_spiffe_id
        # (peer DER, its XFCC header pair) of the last mTLS request: a sidecar's clients are few
        # certificates over many keep-alive requests, so the header is built once per peer
        # certificate (and snapshot), not per request; a bytes compare checks it
        self._xfcc_last: tuple[bytes, tuple[tuple[str, str], ...]] | None = None

    def _xfcc(self, peer_cert_der: bytes) -> tuple[tuple[str, str], ...]:
        last = self._xfcc_last
        if last is not None and last[0] == peer_cert_der:
            return last[1]
        pair = (("x-forwarded-client-cert", xfcc_value(self.local_id, peer_cert_der)),)
        self._xfcc_last = (peer_cert_der, pair)
        return pair

    async def prefetch(self) -> None:
        await self.jwt.prefetch()

    def _pre(self, target: str) -> InboundVerdict | tuple[str, str]:
        try:
            path, query = normalize_path(target, self.mode)
        except PathRejected as exc:
            return InboundVerdict(400, b"Bad Request", f"path_normalization_failed: {exc}")
        return path, query

    def _finish(
        self,
        path: str,
        query: str,
        jr: JwtResult,
        method: str,
        authority: str,
        headers: Mapping[str, str],
        port: int,
        peer_principal: str,
        source_ip: str,
        peer_cert_der: bytes | None,
    ) -> InboundVerdict:
        if jr.status == "failed":
            detail = "jwt_authn_access_denied{" + jr.message.replace(" ", "_") + "}"
            return InboundVerdict(UNAUTHORIZED_STATUS, jr.message.encode(), detail)
        xfcc: tuple[tuple[str, str], ...] = ()
        if peer_cert_der and self.local_id:
            xfcc = self._xfcc(peer_cert_der)
        if self.authz.enabled:
            d = self.authz.check(
                RequestAttributes(
                    method=method,
                    path=path,
                    host=authority,
                    port=port,
                    headers=headers,
                    source_principal=peer_principal,
                    source_ip=source_ip,
                    request_principal=jr.principal,
                    claims=jr.claims,
                )
            )
            if not d.allowed:
                detail = f"rbac_access_denied_matched_policy[{d.policy or 'none'}]"
                return InboundVerdict(DENIED_STATUS, DENIED_BODY, detail, decision=d)
        else:
            d = None
        return InboundVerdict(
            0,
            path=path + query,
            request_principal=jr.principal,
            set_headers=jr.set_headers + xfcc if jr.set_headers else xfcc,
            remove_headers=(
                (*jr.remove_headers, "x-forwarded-client-cert")
                if jr.remove_headers
                else _REMOVE_XFCC
            ),
            decision=d,
        )

    def check(
        self,
        method: str,
        target: str,
        authority: str,
        headers: Mapping[str, str],
        port: int,
        peer_principal: str = "",
        source_ip: str = "",
        peer_cert_der: bytes | None = None,
    ) -> InboundVerdict | None:
        pre = self._pre(target)
        if isinstance(pre, InboundVerdict):
            return pre
        path, query = pre
        jr = self.jwt.try_authenticate(headers, path + query) if self.jwt.enabled else _NO_JWT
        if jr is None:
            return None
        return self._finish(
            path,
            query,
            jr,
            method,
            authority,
            headers,
            port,
            peer_principal,
            source_ip,
            peer_cert_der,
        )

    async def check_async(
        self,
        method: str,
        target: str,
        authority: str,
        headers: Mapping[str, str],
        port: int,
        peer_principal: str = "",
        source_ip: str = "",
        peer_cert_der: bytes | None = None,
    ) -> InboundVerdict:
        pre = self._pre(target)
        if isinstance(pre, InboundVerdict):
            return pre
        path, query = pre
        jr = await self.jwt.authenticate(headers, path + query) if self.jwt.enabled else _NO_JWT
        return self._finish(
            path,
            query,
            jr,
            method,
            authority,
            headers,
            port,
            peer_principal,
            source_ip,
            peer_cert_der,
        )


_NO_JWT = JwtResult("missing")
_REMOVE_XFCC = ("x-forwarded-client-cert",)

"""AuthorizationPolicy on TCP connections, with Istio's rules for HTTP-only fields.

A TCP connection has no method, path, host, headers or JWT. Istio builds the network RBAC
filter of a TCP port from the same policies, handling HTTP-only fields so that a mistake
never opens access:

- ALLOW policy: a rule that uses any HTTP-only field is left out (it can never match); an
  ALLOW policy left without rules still exists and so denies what nothing else allows;
- DENY / AUDIT policy: the HTTP-only fields are dropped and the rest of the rule applies,
  so the rule denies more, never less.

HTTP-only fields: ``from.source.requestPrincipals`` / ``notRequestPrincipals``,
``to.operation.hosts`` / ``notHosts`` / ``methods`` / ``notMethods`` / ``paths`` /
``notPaths`` and ``when`` keys ``request.*``. What remains for TCP: ports, principals,
namespaces, service accounts, trust domains, IP blocks, ``source.*`` / ``destination.*`` /
``connection.sni`` conditions.

``TcpAuthz(security).check(port, principal, source_ip, dest_ip)`` gives the ``Decision``.
"""

from __future__ import annotations

import msgspec

from diktyo.proxy.filters.authz import AuthzEngine, Decision, RequestAttributes
from diktyo.snapshot.security import AuthzPolicy, AuthzRule, Operation, SecurityConfig, Source

_HTTP_SOURCE = ("request_principals", "not_request_principals")
_HTTP_OPERATION = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")


def _http_condition(key: str) -> bool:
    return key.strip().startswith("request.")


def rule_uses_http(rule: AuthzRule) -> bool:
    """Whether ``rule`` names a field only an HTTP request has."""
    if any(getattr(s, f) for s in rule.sources for f in _HTTP_SOURCE):
        return True
    if any(getattr(o, f) for o in rule.operations for f in _HTTP_OPERATION):
        return True
    return any(_http_condition(c.key) for c in rule.conditions)


def _strip(rule: AuthzRule) -> AuthzRule:
    sources = tuple(
        msgspec.structs.replace(s, **dict.fromkeys(_HTTP_SOURCE, ())) for s in rule.sources
    )
    ops = tuple(
        msgspec.structs.replace(o, **dict.fromkeys(_HTTP_OPERATION, ())) for o in rule.operations
    )
    conds = tuple(c for c in rule.conditions if not _http_condition(c.key))
    # a source / operation emptied by the stripping matches anything, as in Istio
    return AuthzRule(sources=sources, operations=ops, conditions=conds)


def tcp_policies(policies: tuple[AuthzPolicy, ...]) -> tuple[AuthzPolicy, ...]:
    """The policies as Istio applies them to a TCP connection (see module docstring)."""
    out: list[AuthzPolicy] = []
    for p in policies:
        if p.action == "ALLOW":
            rules = tuple(r for r in p.rules if not rule_uses_http(r))
        elif p.action in ("DENY", "AUDIT"):
            rules = tuple(_strip(r) if rule_uses_http(r) else r for r in p.rules)
        else:
            rules = p.rules
        out.append(msgspec.structs.replace(p, rules=rules))
    return tuple(out)


class TcpAuthz:
    """The AuthorizationPolicies of one workload compiled for TCP connections."""

    __slots__ = ("engine",)

    def __init__(self, security: SecurityConfig) -> None:
        self.engine = AuthzEngine(tcp_policies(security.authz))

    @property
    def enabled(self) -> bool:
        return self.engine.enabled

    def check(self, port: int, principal: str, source_ip: str, dest_ip: str = "") -> Decision:
        attrs = RequestAttributes(
            method="",
            path="",
            port=port,
            source_principal=principal,
            source_ip=source_ip,
            destination_ip=dest_ip,
        )
        return self.engine.check(attrs)


__all__ = ["Operation", "Source", "TcpAuthz", "rule_uses_http", "tcp_policies"]

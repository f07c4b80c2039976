"""Translate Istio's security kinds into one workload's ``SecurityConfig`` (pure).

``build_security(node, resources)`` takes ``diktyo.api`` resources (``.kind``, ``.name``,
``.namespace``, ``.spec`` as a pydantic model with Istio's camelCase aliases, or a plain dict)
and applies Istio's selection rules:

- **PeerAuthentication**: a policy without selector in the root namespace is mesh-wide, in the
  workload's namespace namespace-wide; a policy with a selector matching the workload's labels
  in the workload's namespace is workload-specific. The most specific level that sets a mode
  (not ``UNSET``) wins: workload > namespace > mesh > PERMISSIVE. Within a level the first
  resource wins (Istio: the oldest). ``portLevelMtls`` counts only on workload policies.
- **AuthorizationPolicy** / **RequestAuthentication**: apply when in the workload's namespace
  or in the root namespace, with no selector or a selector matching the workload's labels.
  Policies using ``targetRef(s)`` attach to gateways/waypoints, not sidecars, and are skipped.
  All applicable RequestAuthentication ``jwtRules`` are merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from diktyo.snapshot.model import Node
from diktyo.snapshot.security import (
    AuthzPolicy,
    AuthzRule,
    ClaimToHeader,
    Condition,
    JwtHeader,
    JwtRule,
    MtlsMode,
    Operation,
    PathNormalization,
    PeerAuthn,
    SecurityConfig,
    Source,
)

ROOT_NAMESPACE = "istio-system"
SECURITY_KINDS = frozenset({"PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"})


def _spec(res: Any) -> dict[str, Any]:
    spec = getattr(res, "spec", None)
    if spec is None and isinstance(res, Mapping):
        spec = res.get("spec")
    if spec is None:
        return {}
    if hasattr(spec, "model_dump"):
        return cast(dict[str, Any], spec.model_dump(by_alias=True, exclude_none=True))
    return dict(spec)


def _attr(res: Any, name: str, default: str = "") -> str:
    if isinstance(res, Mapping):
        if name in res:
            return str(res[name])
        return str(res.get("metadata", {}).get(name, default))
    return str(getattr(res, name, default) or default)


def _selector(spec: Mapping[str, Any]) -> dict[str, str] | None:
    sel = spec.get("selector")
    if sel is None:
        return None
    return dict(sel.get("matchLabels") or {})


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _has_target_ref(spec: Mapping[str, Any]) -> bool:
    return bool(spec.get("targetRef") or spec.get("targetRefs"))


def _t(values: Iterable[Any] | None) -> tuple[str, ...]:
    return tuple(str(v) for v in values or ())


def _applies(spec: Mapping[str, Any], ns: str, node: Node, root: str) -> bool:
    if _has_target_ref(spec):
        return False
    if ns != node.namespace and ns != root:
        return False
    sel = _selector(spec)
    return sel is None or _matches(sel, node.labels)


# --------------------------------------------------------------------------- peer authentication


def _mode(m: Any) -> MtlsMode | None:
    mode = (m or {}).get("mode") if isinstance(m, Mapping) else None
    if mode in ("PERMISSIVE", "STRICT", "DISABLE"):
        return cast(MtlsMode, mode)
    return None  # UNSET / missing: inherit


def build_peer_authn(node: Node, resources: Iterable[Any], root: str = ROOT_NAMESPACE) -> PeerAuthn:
    mesh = namespace = workload = None
    for res in resources:
        if _attr(res, "kind") != "PeerAuthentication":
            continue
        spec = _spec(res)
        ns = _attr(res, "namespace", "default")
        sel = _selector(spec)
        entry = (f"{ns}/{_attr(res, 'name')}", spec)
        if sel is None:
            if ns == node.namespace and namespace is None:
                namespace = entry
            elif ns == root and mesh is None:
                mesh = entry
        elif ns == node.namespace and _matches(sel, node.labels) and workload is None:
            workload = entry
    mode: MtlsMode = "PERMISSIVE"
    source = ""
    for level in (mesh, namespace, workload):
        if level is not None and (m := _mode(level[1].get("mtls"))) is not None:
            mode, source = m, level[0]
    ports: dict[int, MtlsMode] = {}
    if workload is not None:
        for port, m in (workload[1].get("portLevelMtls") or {}).items():
            pm = _mode(m)
            try:
                ports[int(port)] = pm or mode
            except (TypeError, ValueError):
                continue
    return PeerAuthn(mode=mode, port_modes=ports, source=source)


# --------------------------------------------------------------------------- authorization


def _source(s: Mapping[str, Any]) -> Source:
    return Source(
        principals=_t(s.get("principals")),
        not_principals=_t(s.get("notPrincipals")),
        request_principals=_t(s.get("requestPrincipals")),
        not_request_principals=_t(s.get("notRequestPrincipals")),
        namespaces=_t(s.get("namespaces")),
        not_namespaces=_t(s.get("notNamespaces")),
        service_accounts=_t(s.get("serviceAccounts")),
        not_service_accounts=_t(s.get("notServiceAccounts")),
        trust_domains=_t(s.get("trustDomains")),
        not_trust_domains=_t(s.get("notTrustDomains")),
        ip_blocks=_t(s.get("ipBlocks")),
        not_ip_blocks=_t(s.get("notIpBlocks")),
        remote_ip_blocks=_t(s.get("remoteIpBlocks")),
        not_remote_ip_blocks=_t(s.get("notRemoteIpBlocks")),
    )


def _operation(o: Mapping[str, Any]) -> Operation:
    return Operation(
        hosts=_t(o.get("hosts")),
        not_hosts=_t(o.get("notHosts")),
        ports=_t(o.get("ports")),
        not_ports=_t(o.get("notPorts")),
        methods=_t(o.get("methods")),
        not_methods=_t(o.get("notMethods")),
        paths=_t(o.get("paths")),
        not_paths=_t(o.get("notPaths")),
    )


def _rule(r: Mapping[str, Any]) -> AuthzRule:
    return AuthzRule(
        sources=tuple(_source(f.get("source") or {}) for f in r.get("from") or ()),
        operations=tuple(_operation(t.get("operation") or {}) for t in r.get("to") or ()),
        conditions=tuple(
            Condition(
                key=str(c["key"]), values=_t(c.get("values")), not_values=_t(c.get("notValues"))
            )
            for c in r.get("when") or ()
        ),
    )


def build_authz(
    node: Node, resources: Iterable[Any], root: str = ROOT_NAMESPACE
) -> tuple[AuthzPolicy, ...]:
    out = []
    for res in resources:
        if _attr(res, "kind") != "AuthorizationPolicy":
            continue
        spec = _spec(res)
        ns = _attr(res, "namespace", "default")
        if not _applies(spec, ns, node, root):
            continue
        provider = spec.get("provider") or {}
        out.append(
            AuthzPolicy(
                name=_attr(res, "name"),
                namespace=ns,
                action=spec.get("action") or "ALLOW",
                rules=tuple(_rule(r) for r in spec.get("rules") or ()),
                provider=str(provider.get("name") or ""),
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------- request authentication


def _seconds(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    from diktyo.api.duration import parse_duration

    return parse_duration(str(v))


def _jwt_rule(r: Mapping[str, Any], source: str) -> JwtRule:
    return JwtRule(
        issuer=str(r.get("issuer") or ""),
        audiences=_t(r.get("audiences")),
        jwks=str(r.get("jwks") or ""),
        jwks_uri=str(r.get("jwksUri") or r.get("jwks_uri") or ""),
        from_headers=tuple(
            JwtHeader(name=str(h["name"]).lower(), prefix=str(h.get("prefix") or ""))
            for h in r.get("fromHeaders") or ()
        ),
        from_params=_t(r.get("fromParams")),
        from_cookies=_t(r.get("fromCookies")),
        forward_original_token=bool(r.get("forwardOriginalToken") or False),
        output_payload_to_header=str(r.get("outputPayloadToHeader") or ""),
        output_claim_to_headers=tuple(
            ClaimToHeader(header=str(c["header"]), claim=str(c["claim"]))
            for c in r.get("outputClaimToHeaders") or ()
        ),
        timeout=_seconds(r.get("timeout")),
        source=source,
    )


def build_jwt_rules(
    node: Node, resources: Iterable[Any], root: str = ROOT_NAMESPACE
) -> tuple[JwtRule, ...]:
    out: list[JwtRule] = []
    for res in resources:
        if _attr(res, "kind") != "RequestAuthentication":
            continue
        spec = _spec(res)
        ns = _attr(res, "namespace", "default")
        if not _applies(spec, ns, node, root):
            continue
        src = f"{ns}/{_attr(res, 'name')}"
        out.extend(_jwt_rule(r, src) for r in spec.get("jwtRules") or ())
    return tuple(out)


def build_security(
    node: Node,
    resources: list[Any],
    *,
    root_namespace: str = ROOT_NAMESPACE,
    path_normalization: PathNormalization = "BASE",
) -> SecurityConfig:
    """The ``SecurityConfig`` for ``node`` from all user resources (other kinds are ignored)."""
    sec = [r for r in resources if _attr(r, "kind") in SECURITY_KINDS]
    return SecurityConfig(
        peer_authn=build_peer_authn(node, sec, root_namespace),
        authz=build_authz(node, sec, root_namespace),
        jwt_rules=build_jwt_rules(node, sec, root_namespace),
        path_normalization=path_normalization,
    )

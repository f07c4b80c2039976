"""Translate Istio's security kinds into one workload's ``SecurityConfig`` (pure).

``build_security(node, resources)`` takes ``diktyo.api`` resources (``.kind``, ``.name``,
``.namespace``, ``.spec`` as the kind's typed model from ``diktyo.api.security``; a plain dict
spec is validated into that model first) and applies Istio's selection rules:

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
from typing import Any

from diktyo.api import security as api
from diktyo.api.base import LabelSelector
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


_MODELS: dict[str, type[Any]] = {
    "PeerAuthentication": api.PeerAuthentication,
    "AuthorizationPolicy": api.AuthorizationPolicy,
    "RequestAuthentication": api.RequestAuthentication,
}


def _spec(res: Any, kind: str) -> Any:
    """The typed spec of ``res`` (a plain dict spec is validated into the kind's model)."""
    spec = getattr(res, "spec", None)
    if spec is None and isinstance(res, Mapping):
        spec = res.get("spec")
    model = _MODELS[kind]
    if isinstance(spec, model):
        return spec
    return model.model_validate(spec or {})


def _attr(res: Any, name: str, default: str = "") -> str:
    if isinstance(res, Mapping):
        if name in res:
            return str(res[name])
        return str(res.get("metadata", {}).get(name, default))
    return str(getattr(res, name, default) or default)


def _selector(spec: Any) -> dict[str, str] | None:
    sel: LabelSelector | None = spec.selector
    return None if sel is None else dict(sel.match_labels)


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _t(values: Iterable[Any] | None) -> tuple[str, ...]:
    return tuple(str(v) for v in values or ())


def _applies(
    spec: api.AuthorizationPolicy | api.RequestAuthentication, ns: str, node: Node, root: str
) -> bool:
    if spec.target_ref is not None or spec.target_refs:
        return False  # attached to gateways / waypoints, not sidecars
    if ns != node.namespace and ns != root:
        return False
    sel = _selector(spec)
    return sel is None or _matches(sel, node.labels)


# --------------------------------------------------------------------------- peer authentication


def _mode(m: api.MutualTLS | None) -> MtlsMode | None:
    mode = None if m is None else m.mode
    if mode is None or mode == "UNSET":
        return None  # inherit
    return mode


def build_peer_authn(node: Node, resources: Iterable[Any], root: str = ROOT_NAMESPACE) -> PeerAuthn:
    mesh = namespace = workload = None
    for res in resources:
        if _attr(res, "kind") != "PeerAuthentication":
            continue
        spec: api.PeerAuthentication = _spec(res, "PeerAuthentication")
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
        if level is not None and (m := _mode(level[1].mtls)) is not None:
            mode, source = m, level[0]
    ports: dict[int, MtlsMode] = {}
    if workload is not None:
        for port, pm_spec in workload[1].port_level_mtls.items():
            pm = _mode(pm_spec)
            try:
                ports[int(port)] = pm or mode
            except (TypeError, ValueError):
                continue
    return PeerAuthn(mode=mode, port_modes=ports, source=source)


# --------------------------------------------------------------------------- authorization


def _source(s: api.Source) -> Source:
    return Source(
        principals=_t(s.principals),
        not_principals=_t(s.not_principals),
        request_principals=_t(s.request_principals),
        not_request_principals=_t(s.not_request_principals),
        namespaces=_t(s.namespaces),
        not_namespaces=_t(s.not_namespaces),
        service_accounts=_t(s.service_accounts),
        not_service_accounts=_t(s.not_service_accounts),
        trust_domains=_t(s.trust_domains),
        not_trust_domains=_t(s.not_trust_domains),
        ip_blocks=_t(s.ip_blocks),
        not_ip_blocks=_t(s.not_ip_blocks),
        remote_ip_blocks=_t(s.remote_ip_blocks),
        not_remote_ip_blocks=_t(s.not_remote_ip_blocks),
    )


def _operation(o: api.Operation) -> Operation:
    return Operation(
        hosts=_t(o.hosts),
        not_hosts=_t(o.not_hosts),
        ports=_t(o.ports),
        not_ports=_t(o.not_ports),
        methods=_t(o.methods),
        not_methods=_t(o.not_methods),
        paths=_t(o.paths),
        not_paths=_t(o.not_paths),
    )


def _rule(r: api.Rule) -> AuthzRule:
    return AuthzRule(
        sources=tuple(_source(f.source or api.Source()) for f in r.from_),
        operations=tuple(_operation(t.operation or api.Operation()) for t in r.to),
        conditions=tuple(
            Condition(key=c.key, values=_t(c.values), not_values=_t(c.not_values)) for c in r.when
        ),
    )


def build_authz(
    node: Node, resources: Iterable[Any], root: str = ROOT_NAMESPACE
) -> tuple[AuthzPolicy, ...]:
    out = []
    for res in resources:
        if _attr(res, "kind") != "AuthorizationPolicy":
            continue
        spec: api.AuthorizationPolicy = _spec(res, "AuthorizationPolicy")
        ns = _attr(res, "namespace", "default")
        if not _applies(spec, ns, node, root):
            continue
        out.append(
            AuthzPolicy(
                name=_attr(res, "name"),
                namespace=ns,
                action=spec.action or "ALLOW",
                rules=tuple(_rule(r) for r in spec.rules),
                provider=(spec.provider.name or "") if spec.provider is not None else "",
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------- request authentication


def _jwt_rule(r: api.JWTRule, source: str) -> JwtRule:
    return JwtRule(
        issuer=r.issuer or "",
        audiences=_t(r.audiences),
        jwks=r.jwks or "",
        jwks_uri=r.jwks_uri or r.jwks_uri_legacy or "",
        from_headers=tuple(
            JwtHeader(name=h.name.lower(), prefix=h.prefix or "") for h in r.from_headers
        ),
        from_params=_t(r.from_params),
        from_cookies=_t(r.from_cookies),
        forward_original_token=bool(r.forward_original_token),
        output_payload_to_header=r.output_payload_to_header or "",
        output_claim_to_headers=tuple(
            ClaimToHeader(header=c.header, claim=c.claim) for c in r.output_claim_to_headers
        ),
        timeout=r.timeout,
        source=source,
    )


def build_jwt_rules(
    node: Node, resources: Iterable[Any], root: str = ROOT_NAMESPACE
) -> tuple[JwtRule, ...]:
    out: list[JwtRule] = []
    for res in resources:
        if _attr(res, "kind") != "RequestAuthentication":
            continue
        spec: api.RequestAuthentication = _spec(res, "RequestAuthentication")
        ns = _attr(res, "namespace", "default")
        if not _applies(spec, ns, node, root):
            continue
        src = f"{ns}/{_attr(res, 'name')}"
        out.extend(_jwt_rule(r, src) for r in spec.jwt_rules)
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

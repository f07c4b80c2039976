"""DestinationRule checks: TLS without CA certificates (IST0128, IST0129), unknown hosts
(IST0174), duplicate subsets (IST0106), several rules for one host (DKT0104)."""

from __future__ import annotations

from typing import Any

from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context


def check(ctx: Context) -> None:
    by_host: dict[str, list[Any]] = {}
    for dr in ctx.idx.destination_rules:
        host = ctx.resolve(dr.spec.host, dr.namespace)
        by_host.setdefault(host, []).append(dr)
        names: dict[str, int] = {}
        for i, s in enumerate(dr.spec.subsets):
            if s.name in names:
                ctx.report(
                    m.SCHEMA_VALIDATION_ERROR,
                    dr,
                    f"spec.subsets[{i}].name",
                    f"Schema validation error: duplicate subset names: {s.name}",
                    f"also spec.subsets[{names[s.name]}]; give each subset a unique name",
                )
            names.setdefault(s.name, i)
        if (
            ctx.registry_known
            and "*" not in dr.spec.host
            and ctx.lookup(dr.spec.host, dr.namespace) is None
        ):
            ctx.report(
                m.UNKNOWN_DESTINATION_RULE_HOST,
                dr,
                "spec.host",
                f"The host {dr.spec.host} defined in the DestinationRule does not match any "
                "services in the mesh.",
                ctx.suggest(dr.spec.host, dr.namespace)
                or "check the spelling, or add a ServiceEntry or Kubernetes Service for it",
            )
        _check_ca_certificates(ctx, dr)
    for host, rules in by_host.items():
        first = rules[0]
        first_subsets = {s.name for s in first.spec.subsets}
        for other in rules[1:]:
            if other.key == first.key:
                continue  # a second copy of the same rule: DKT0101
            where = f"{first.namespace}/{first.name} at {ctx.where(first)}"
            clash = sorted(first_subsets & {s.name for s in other.spec.subsets})
            if clash:
                ctx.report(
                    m.CONFLICTING_DESTINATION_RULES,
                    other,
                    "spec.subsets",
                    f"conflicts with DestinationRule {where} for host {host}: "
                    f"subset(s) {', '.join(clash)} defined in both; the first definition is used",
                    "keep one DestinationRule per host",
                    level="Error",
                )
            if other.spec.traffic_policy is not None:
                ctx.report(
                    m.CONFLICTING_DESTINATION_RULES,
                    other,
                    "spec.trafficPolicy",
                    f"conflicts with DestinationRule {where} for host {host}: "
                    "only the first rule's trafficPolicy applies",
                    "merge the two DestinationRules into one",
                )
            first_subsets |= {s.name for s in other.spec.subsets}


def _needs_ca(tls: Any) -> bool:
    """SIMPLE or MUTUAL origination with no CA to verify the server with."""
    if tls is None or tls.mode not in ("SIMPLE", "MUTUAL"):
        return False
    return not tls.ca_certificates and not tls.credential_name


def _check_ca_certificates(ctx: Context, dr: Any) -> None:
    policy = dr.spec.traffic_policy
    if policy is None:
        return
    full = f"{dr.namespace}/{dr.name}"
    if _needs_ca(policy.tls):
        ctx.report(
            m.NO_SERVER_CERT_VERIFICATION_DESTINATION,
            dr,
            "spec.trafficPolicy.tls",
            f"DestinationRule {full} in namespace {dr.namespace} has TLS mode set to "
            f"{policy.tls.mode} but no caCertificates are set to validate server identity for "
            f"host: {dr.spec.host}",
            "set tls.caCertificates (a CA bundle file) or tls.credentialName",
        )
    for i, pls in enumerate(policy.port_level_settings):
        if _needs_ca(pls.tls):
            port = pls.port.number if pls.port is not None else ""
            ctx.report(
                m.NO_SERVER_CERT_VERIFICATION_PORT,
                dr,
                f"spec.trafficPolicy.portLevelSettings[{i}].tls",
                f"DestinationRule {full} in namespace {dr.namespace} has TLS mode set to "
                f"{pls.tls.mode} but no caCertificates are set to validate server identity for "
                f"host: {dr.spec.host} at port number:{port}",
                "set tls.caCertificates (a CA bundle file) or tls.credentialName",
            )

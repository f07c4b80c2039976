"""Gateway checks: conflicting gateways (IST0145), duplicate certificates (IST0138), servers
diktyo cannot serve (DKT0107)."""

from __future__ import annotations

from typing import Any

from diktyo.control.translate.hosts import is_http, protocol_of
from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context
from diktyo.control.validate.virtualservice import overlaps


def check(ctx: Context) -> None:
    for gw in ctx.idx.gateways:
        if not gw.spec.servers:
            ctx.report(
                m.SCHEMA_VALIDATION_ERROR,
                gw,
                "spec",
                "Schema validation error: gateway must have at least one server",
                "add 'servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [...]}]'",
            )
        for i, server in enumerate(gw.spec.servers):
            proto = protocol_of(server.port.name, server.port.protocol)
            if not is_http(proto):
                ctx.report(
                    m.UNSUPPORTED,
                    gw,
                    f"spec.servers[{i}].port.protocol",
                    f"protocol {server.port.protocol} is not served by diktyo gateways; "
                    "server ignored",
                    "use protocol HTTP",
                )
            if server.tls is not None and server.tls.https_redirect is not True:
                ctx.report(
                    m.UNSUPPORTED,
                    gw,
                    f"spec.servers[{i}].tls",
                    "TLS termination at the gateway is not supported by diktyo; server ignored",
                    "serve HTTP",
                )
    _check_conflicts(ctx)
    _check_duplicate_certificates(ctx)


def selector_string(selector: dict[str, str]) -> str:
    """Kubernetes' label selector string: ``k1=v1,k2=v2`` sorted by key."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _check_conflicts(ctx: Context) -> None:
    """Istio's ConflictingGatewayAnalyzer: same selector, same port, overlapping hosts."""
    by_key: dict[tuple[str, int], dict[str, list[str]]] = {}
    for gw in ctx.idx.gateways:
        sel = selector_string(gw.spec.selector)
        for server in gw.spec.servers:
            by_key.setdefault((sel, server.port.number), {})[f"{gw.namespace}/{gw.name}"] = list(
                server.hosts
            )
    for gw in ctx.idx.gateways:
        me = f"{gw.namespace}/{gw.name}"
        sel = selector_string(gw.spec.selector)
        for i, server in enumerate(gw.spec.servers):
            clash = [
                other
                for other, hosts in by_key.get((sel, server.port.number), {}).items()
                if other != me and any(overlaps(h, oh) for h in server.hosts for oh in hosts)
            ]
            if clash:
                ctx.report(
                    m.CONFLICTING_GATEWAYS,
                    gw,
                    f"spec.servers[{i}]",
                    f"Conflict with gateways {','.join(clash)} (workload selector {sel}, port "
                    f"{server.port.number}, hosts {','.join(server.hosts)}).",
                    "serve these hosts from one Gateway, or use another port or selector",
                )


def _same_certificate(a: Any, b: Any) -> bool:
    if a.credential_name and b.credential_name:
        return bool(a.credential_name == b.credential_name)
    if a.credential_name or b.credential_name:
        return False
    if not a.server_certificate or a.server_certificate != b.server_certificate:
        return False
    return bool(a.private_key and b.private_key and a.private_key == b.private_key)


def _selector_subset(x: dict[str, str], y: dict[str, str]) -> bool:
    return all(y.get(k) == v for k, v in x.items())


def _check_duplicate_certificates(ctx: Context) -> None:
    """Istio's CertificateAnalyzer: gateways on the same workloads sharing one certificate."""
    for gw in ctx.idx.gateways:
        me = f"{gw.namespace}/{gw.name}"
        for other in ctx.idx.gateways:
            if other is gw or not _selector_subset(gw.spec.selector, other.spec.selector):
                continue
            for server in gw.spec.servers:
                for os_ in other.spec.servers:
                    if server.tls is None or os_.tls is None:
                        continue
                    if _same_certificate(server.tls, os_.tls):
                        ctx.report(
                            m.GATEWAY_DUPLICATE_CERTIFICATE,
                            gw,
                            "metadata.name",
                            f"Duplicate certificate in multiple gateways [{me} "
                            f"{other.namespace}/{other.name}] may cause 404s if clients re-use "
                            "HTTP2 connections.",
                            "give each gateway its own certificate, or merge the gateways",
                        )

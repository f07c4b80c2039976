"""Kubernetes Service checks: port names outside Istio's naming convention (IST0118), and
ports of ExternalName Services without a protocol in their name (IST0150)."""

from __future__ import annotations

from typing import Any

from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context

# the protocols Istio reads from a port name (``http``, ``http-web``, ``grpc-api``, ...) or
# from appProtocol; case does not matter
PROTOCOLS = frozenset(
    ("tcp", "udp", "grpc", "grpc-web", "http", "http_proxy", "http2", "https", "tls")
    + ("mongo", "redis", "mysql")
)
SYSTEM_NAMESPACES = frozenset(
    ("kube-system", "kube-public", "kube-node-lease", "local-path-storage")
)


def port_protocol(name: str, protocol: str, app_protocol: str | None) -> str:
    """Istio's protocol selection for a Service port: UDP ports are UDP; else appProtocol,
    else the port name up to its first '-' (``grpc-web`` whole); '' when unsupported."""
    if protocol.upper() == "UDP":
        return "udp"
    text = (app_protocol or name or "").lower()
    if text.startswith("grpc-web"):
        return "grpc-web"
    prefix = text.split("-", 1)[0]
    return prefix if prefix in PROTOCOLS else ""


def check(ctx: Context) -> None:
    for svc in ctx.services:
        if svc.namespace in SYSTEM_NAMESPACES or svc.namespace == "istio-system":
            continue
        spec = svc.spec
        external = getattr(spec, "type", "") == "ExternalName"
        for i, port in enumerate(getattr(spec, "ports", ()) or ()):
            _check_port(ctx, svc, i, port, external)


def _check_port(ctx: Context, svc: Any, i: int, port: Any, external: bool) -> None:
    name = getattr(port, "name", None) or ""
    proto = port_protocol(
        name, getattr(port, "protocol", "TCP") or "TCP", getattr(port, "app_protocol", None)
    )
    if proto and not (external and name == "tcp"):
        return
    if external:
        ctx.report(
            m.EXTERNAL_NAME_INVALID_PORT_NAME,
            svc,
            f"spec.ports[{i}]",
            "Port name for ExternalName service is invalid. Proxy may prevent tcp named ports "
            "and unmatched traffic for ports serving TCP protocol from being forwarded correctly",
            "name the port after its protocol other than plain tcp (e.g. https, tls, http)",
        )
        return
    number = getattr(port, "port", 0)
    target = getattr(port, "target_port", None)
    ctx.report(
        m.PORT_NAME_NOT_UNDER_CONVENTION,
        svc,
        f"spec.ports[{i}]",
        f"Port name {name} (port: {number}, targetPort: {target or number}) doesn't follow the "
        "naming convention of Istio port.",
        "name it <protocol>[-<suffix>] (e.g. http-web, grpc, tcp-db) or set appProtocol",
    )

"""Kubernetes Service checks: port names outside Istio's naming convention (IST0118)."""

from __future__ import annotations

from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context

# Istio's protocols a port name may start with (``http``, ``http-web``, ``grpc-api``, ...)
PROTOCOLS = (
    "http",
    "http2",
    "https",
    "http_proxy",
    "grpc",
    "grpc-web",
    "h2c",
    "tcp",
    "tls",
    "udp",
    "mongo",
    "mysql",
    "redis",
)
SYSTEM_NAMESPACES = (
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "istio-system",
    "local-path-storage",
)


def follows_convention(name: str) -> bool:
    name = name.lower()
    return any(name == p or name.startswith(p + "-") for p in PROTOCOLS)


def check(ctx: Context) -> None:
    for svc in ctx.services:
        if svc.namespace in SYSTEM_NAMESPACES:
            continue
        spec = svc.spec
        if getattr(spec, "type", "") == "ExternalName":
            continue
        for i, port in enumerate(getattr(spec, "ports", ()) or ()):
            name = getattr(port, "name", None) or ""
            if getattr(port, "app_protocol", None) or follows_convention(name):
                continue
            target = getattr(port, "target_port", None)
            number = getattr(port, "port", 0)
            ctx.report(
                m.PORT_NAME_NOT_UNDER_CONVENTION,
                svc,
                f"spec.ports[{i}].name",
                f"Port name {name} (port: {number}, targetPort: {target or number}) doesn't "
                "follow the naming convention of Istio port.",
                "name it <protocol>[-<suffix>] (e.g. http-web, grpc, tcp-db) or set appProtocol",
            )

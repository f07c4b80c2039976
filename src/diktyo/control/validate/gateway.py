"""Gateway checks: servers diktyo cannot serve."""

from __future__ import annotations

from diktyo.control.translate.hosts import is_http, protocol_of
from diktyo.control.validate.context import Context


def check(ctx: Context) -> None:
    ports: dict[int, str] = {}
    for gw in ctx.idx.gateways:
        for i, server in enumerate(gw.spec.servers):
            proto = protocol_of(server.port.name, server.port.protocol)
            if not is_http(proto):
                ctx.report(
                    gw,
                    f"spec.servers[{i}].port.protocol",
                    f"protocol {server.port.protocol} is not served by diktyo gateways; "
                    "server ignored",
                    "use protocol HTTP",
                    "warning",
                )
            if server.tls is not None and server.tls.https_redirect is not True:
                ctx.report(
                    gw,
                    f"spec.servers[{i}].tls",
                    "TLS termination at the gateway is not supported by diktyo; server ignored",
                    "serve HTTP",
                    "warning",
                )
            ports.setdefault(server.port.number, gw.name)

"""ServiceEntry checks: endpoints that cannot be reached."""

from __future__ import annotations

from diktyo.control.validate.context import Context


def check(ctx: Context) -> None:
    for se in ctx.idx.service_entries:
        spec = se.spec
        names = {p.name for p in spec.ports}
        if not spec.ports:
            ctx.report(
                se,
                "spec.hosts",
                "no ports",
                "add 'ports: [{number: 80, name: http, protocol: HTTP}]'",
            )
        for i, ep in enumerate(spec.endpoints):
            if not ep.address:
                ctx.report(
                    se,
                    f"spec.endpoints[{i}]",
                    "endpoint without address is ignored",
                    "add 'address: 127.0.0.1'",
                    "warning",
                )
            for name in ep.ports:
                if name not in names:
                    ctx.report(
                        se,
                        f"spec.endpoints[{i}].ports.{name}",
                        f"port name {name!r} is not one of the ServiceEntry's ports",
                        f"use one of: {', '.join(sorted(names))}",
                    )


def check_sidecars(ctx: Context) -> None:
    for sc in ctx.idx.sidecars:
        spec = sc.spec
        for i, listener in enumerate(spec.egress):
            for j, host in enumerate(listener.hosts):
                ns, sep, name = host.partition("/")
                if not sep or not ns or not name:
                    ctx.report(
                        sc,
                        f"spec.egress[{i}].hosts[{j}]",
                        f"egress host {host!r} must have the form namespace/dnsName",
                        f"e.g. './{host}' for the Sidecar's namespace or '*/{host}' for any",
                    )
        for field in ("ingress", "outbound_traffic_policy", "inbound_connection_pool"):
            if getattr(spec, field):
                name = {
                    "ingress": "ingress",
                    "outbound_traffic_policy": "outboundTrafficPolicy",
                    "inbound_connection_pool": "inboundConnectionPool",
                }[field]
                ctx.report(
                    sc,
                    f"spec.{name}",
                    f"{name} is accepted but not applied by diktyo",
                    "only egress hosts are applied; remove it to silence this warning",
                    "warning",
                )

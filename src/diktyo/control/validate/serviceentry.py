"""ServiceEntry checks: addresses for TCP ports (IST0134), conflicting protocols (IST0177),
endpoint ports (IST0106), endpoints diktyo cannot reach (DKT0107)."""

from __future__ import annotations

from typing import Any

from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context, fqdn


def check(ctx: Context) -> None:
    for se in ctx.idx.service_entries:
        spec = se.spec
        names = {p.name for p in spec.ports}
        if not spec.addresses:
            # Istio's ProtocolAddressesAnalyzer (diktyo has no DNS auto-allocation)
            for i, port in enumerate(spec.ports):
                if not port.protocol or port.protocol.upper() == "TCP":
                    ctx.report(
                        m.SERVICE_ENTRY_ADDRESSES_REQUIRED,
                        se,
                        f"spec.ports[{i}]",
                        "ServiceEntry addresses are required for this protocol.",
                        "add 'addresses: [VIP]', or set the port's protocol (e.g. HTTP)",
                    )
        for i, ep in enumerate(spec.endpoints):
            if not ep.address:
                ctx.report(
                    m.UNSUPPORTED,
                    se,
                    f"spec.endpoints[{i}]",
                    "endpoint without address (network only) is ignored by diktyo",
                    "add 'address: 127.0.0.1'",
                )
            for name in ep.ports:
                if name not in names:
                    ctx.report(
                        m.SCHEMA_VALIDATION_ERROR,
                        se,
                        f"spec.endpoints[{i}].ports.{name}",
                        f"Schema validation error: endpoint port {name} is not defined by the "
                        "service entry",
                        f"use one of: {', '.join(sorted(names))}" if names else "add spec.ports",
                    )
    _check_protocols(ctx)


def _visible(se: Any) -> set[str] | None:
    """Namespaces that see ``se`` (None = all)."""
    export = se.spec.export_to
    if not export or "*" in export:
        return None
    return {se.namespace if e == "." else e for e in export}


def _share_namespace(a: set[str] | None, b: set[str] | None) -> bool:
    return a is None or b is None or bool(a & b)


def _check_protocols(ctx: Context) -> None:
    """Istio's IST0177: ServiceEntries seen together define one host:port with two protocols."""
    by_port: dict[tuple[str, int], list[tuple[Any, str]]] = {}
    for se in ctx.idx.service_entries:
        for port in se.spec.ports:
            proto = (port.protocol or "").upper() or "UNSET"
            for h in se.spec.hosts:
                by_port.setdefault((fqdn(h, se.namespace), port.number), []).append((se, proto))
    for (host, number), entries in by_port.items():
        for se, _proto in entries:
            peers = [(o, p) for o, p in entries if _share_namespace(_visible(se), _visible(o))]
            protos = sorted({p for _, p in peers})
            if len(protos) < 2:
                continue
            names = ", ".join(sorted({f"{o.namespace}/{o.name}" for o, _ in peers}))
            ctx.report(
                m.CONFLICTING_SERVICE_ENTRY_PROTOCOL,
                se,
                "spec.ports",
                f'Multiple ServiceEntries ({names}) define the same host "{host}" and port '
                f"{number} with conflicting protocols ({', '.join(protos)}).",
                "use one protocol for the port in every ServiceEntry, or keep the host in one",
            )

"""Sidecar checks: several Sidecars for one workload (IST0110, IST0111), egress host form
(IST0106), deprecated and unapplied fields (IST0002, DKT0107)."""

from __future__ import annotations

from typing import Any

from diktyo.control.translate.hosts import selector_matches
from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context
from diktyo.control.validate.gateway import selector_string


def check(ctx: Context) -> None:
    for sc in ctx.idx.sidecars:
        _check_one(ctx, sc)
    _check_selectors(ctx)


def _check_one(ctx: Context, sc: Any) -> None:
    spec = sc.spec
    for i, listener in enumerate(spec.egress):
        for j, host in enumerate(listener.hosts):
            ns, sep, name = host.partition("/")
            if not sep or not ns or not name:
                ctx.report(
                    m.SCHEMA_VALIDATION_ERROR,
                    sc,
                    f"spec.egress[{i}].hosts[{j}]",
                    f"Schema validation error: sidecar: invalid egress host {host!r}: "
                    "must be of the form namespace/dnsName",
                    f"e.g. './{host}' for the Sidecar's namespace or '*/{host}' for any",
                )
    otp = spec.outbound_traffic_policy
    if otp is not None and otp.egress_proxy is not None:
        ctx.report(
            m.DEPRECATED,
            sc,
            "spec.outboundTrafficPolicy.egressProxy",
            "Deprecated: OutboundTrafficPolicy.EgressProxy ignored",
            "remove egressProxy; route egress traffic with a VirtualService instead",
        )
    for field in ("ingress", "outbound_traffic_policy", "inbound_connection_pool"):
        if getattr(spec, field):
            name = {
                "ingress": "ingress",
                "outbound_traffic_policy": "outboundTrafficPolicy",
                "inbound_connection_pool": "inboundConnectionPool",
            }[field]
            ctx.report(
                m.UNSUPPORTED,
                sc,
                f"spec.{name}",
                f"{name} is accepted but not applied by diktyo",
                "only egress hosts are applied; remove it to silence this warning",
            )


def _selector(sc: Any) -> dict[str, str]:
    ws = sc.spec.workload_selector
    return dict(ws.labels) if ws is not None and ws.labels else {}


def _names(scs: list[Any]) -> str:
    return "[" + " ".join(f"{s.namespace}/{s.name}" for s in scs) + "]"


def _check_selectors(ctx: Context) -> None:
    by_ns: dict[str, list[Any]] = {}
    latest = {sc.key: sc for sc in ctx.idx.sidecars}  # a later copy replaces (DKT0101)
    for sc in latest.values():
        by_ns.setdefault(sc.namespace, []).append(sc)
    reported: set[int] = set()
    for ns, scs in by_ns.items():
        # IST0111: more than one Sidecar without workloadSelector in a namespace
        plain = [s for s in scs if not _selector(s)]
        if len(plain) > 1:
            for sc in plain:
                ctx.report(
                    m.MULTIPLE_SIDECARS_WITHOUT_SELECTORS,
                    sc,
                    "metadata.name",
                    f"The Sidecars {_names(plain)} in namespace {ns!r} have no workload selector, "
                    "which can lead to undefined behavior.",
                    "keep one namespace-wide Sidecar; give the others a workloadSelector",
                )
        selected = [s for s in scs if _selector(s)]
        # IST0101 when the registry knows the workloads: a selector that picks none of them
        if ctx.idx.registry.instances:
            pods = [i for i in ctx.idx.registry.instances if i.namespace == ns]
            for sc in selected:
                if not any(selector_matches(_selector(sc), p.labels) for p in pods):
                    ctx.report(
                        m.REFERENCED_RESOURCE_NOT_FOUND,
                        sc,
                        "spec.workloadSelector",
                        f'Referenced selector not found: "{selector_string(_selector(sc))}"',
                        f"no workload in namespace {ns} has these labels",
                    )
        # IST0110 with the registry's workloads: Sidecars whose selectors pick the same pod
        for inst in ctx.idx.registry.instances:
            if inst.namespace != ns:
                continue
            hits = [s for s in selected if selector_matches(_selector(s), inst.labels)]
            if len(hits) > 1:
                for sc in hits:
                    if id(sc) in reported:
                        continue
                    reported.add(id(sc))
                    _report_conflict(ctx, sc, hits, ns, inst.name)
        # IST0110 without workloads: identical selectors pick the same pods, whichever exist
        by_sel: dict[str, list[Any]] = {}
        for s in selected:
            by_sel.setdefault(selector_string(_selector(s)), []).append(s)
        for sel, same in by_sel.items():
            if len(same) > 1:
                for sc in same:
                    if id(sc) in reported:
                        continue
                    reported.add(id(sc))
                    _report_conflict(ctx, sc, same, ns, f"any pod labelled {sel}")


def _report_conflict(ctx: Context, sc: Any, hits: list[Any], ns: str, pod: str) -> None:
    ctx.report(
        m.CONFLICTING_SIDECAR_WORKLOAD_SELECTORS,
        sc,
        "spec.workloadSelector",
        f"The Sidecars {_names(hits)} in namespace {ns!r} select the same workload pod "
        f"{pod!r}, which can lead to undefined behavior.",
        "make the workloadSelectors pick disjoint workloads, or merge the Sidecars",
    )

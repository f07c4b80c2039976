"""Telemetry checks: several Telemetries for one workload or namespace (IST0159, IST0160).

Telemetry resources are read by attribute (``spec.selector.match_labels``, ``target_ref``,
``target_refs``), so the checks run whenever the loaded config has them.
"""

from __future__ import annotations

from typing import Any

from diktyo.control.translate.hosts import selector_matches
from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context
from diktyo.control.validate.gateway import selector_string


def _selector(t: Any) -> dict[str, str]:
    sel = getattr(t.spec, "selector", None)
    labels = getattr(sel, "match_labels", None) if sel is not None else None
    return dict(labels or {})


def _namespace_wide(t: Any) -> bool:
    spec = t.spec
    return (
        not _selector(t)
        and getattr(spec, "target_ref", None) is None
        and not getattr(spec, "target_refs", None)
    )


def _names(ts: list[Any]) -> str:
    return "[" + " ".join(f"{t.namespace}/{t.name}" for t in ts) + "]"


def check(ctx: Context) -> None:
    latest = {r.key: r for r in ctx.resources if getattr(r, "kind", "") == "Telemetry"}
    by_ns: dict[str, list[Any]] = {}
    for t in latest.values():
        by_ns.setdefault(t.namespace, []).append(t)
    for ns, ts in by_ns.items():
        plain = [t for t in ts if _namespace_wide(t)]
        if len(plain) > 1:
            for t in plain:
                ctx.report(
                    m.MULTIPLE_TELEMETRIES_WITHOUT_SELECTORS,
                    t,
                    "metadata.name",
                    f"The Telemetries {_names(plain)} in namespace {ns!r} have no workload "
                    "selector, which can lead to undefined behavior.",
                    "keep one namespace-wide Telemetry; give the others a selector",
                )
        selected = [t for t in ts if _selector(t)]
        reported: set[int] = set()
        for inst in ctx.idx.registry.instances:
            if inst.namespace != ns:
                continue
            hits = [t for t in selected if selector_matches(_selector(t), inst.labels)]
            if len(hits) > 1:
                for t in hits:
                    if id(t) not in reported:
                        reported.add(id(t))
                        _conflict(ctx, t, hits, ns, inst.name)
        by_sel: dict[str, list[Any]] = {}
        for t in selected:
            by_sel.setdefault(selector_string(_selector(t)), []).append(t)
        for sel, same in by_sel.items():
            if len(same) > 1:
                for t in same:
                    if id(t) not in reported:
                        reported.add(id(t))
                        _conflict(ctx, t, same, ns, f"any pod labelled {sel}")


def _conflict(ctx: Context, t: Any, hits: list[Any], ns: str, pod: str) -> None:
    ctx.report(
        m.CONFLICTING_TELEMETRY_WORKLOAD_SELECTORS,
        t,
        "spec.selector",
        f"The Telemetries {_names(hits)} in namespace {ns!r} select the same workload pod "
        f"{pod!r}, which can lead to undefined behavior.",
        "make the selectors pick disjoint workloads, or merge the Telemetries",
    )

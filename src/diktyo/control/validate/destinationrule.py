"""DestinationRule checks: conflicting rules for one host, duplicate subsets, unknown hosts."""

from __future__ import annotations

from typing import Any

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
                    dr,
                    f"spec.subsets[{i}].name",
                    f"subset {s.name!r} defined twice (also subsets[{names[s.name]}])",
                    "give each subset a unique name",
                )
            names.setdefault(s.name, i)
        if ctx.registry_known and "*" not in host and ctx.idx.service(host) is None:
            ctx.report(
                dr,
                "spec.host",
                f"host {dr.spec.host!r} ({host}) not found in the registry",
                "check the spelling or add a ServiceEntry for it",
                "warning",
            )
    for host, rules in by_host.items():
        first = rules[0]
        first_subsets = {s.name for s in first.spec.subsets}
        for other in rules[1:]:
            where = f"{first.name} at {ctx.where(first)}"
            clash = sorted(first_subsets & {s.name for s in other.spec.subsets})
            if clash:
                ctx.report(
                    other,
                    "spec.subsets",
                    f"conflicts with DestinationRule {where} for host {host}: "
                    f"subset(s) {', '.join(clash)} defined in both",
                    "keep one DestinationRule per host",
                )
            if other.spec.traffic_policy is not None:
                ctx.report(
                    other,
                    "spec.trafficPolicy",
                    f"conflicts with DestinationRule {where} for host {host}: "
                    "only the first rule's trafficPolicy applies",
                    "merge the two DestinationRules into one",
                    "warning",
                )
            first_subsets |= {s.name for s in other.spec.subsets}

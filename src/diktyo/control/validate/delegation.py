"""VirtualService delegation checks: delegates that are missing, not exported, or never used.

Istio drops such routes silently (a debug log in istiod); these warnings say which and why.
"""

from __future__ import annotations

from diktyo.control.translate.delegation import delegate_key, find_delegate, merge_matches
from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context


def check(ctx: Context) -> None:
    for vs in ctx.idx.virtual_services:
        if not vs.spec.hosts:
            continue
        for i, rule in enumerate(vs.spec.http):
            if rule.delegate is None:
                continue
            dvs, why = find_delegate(ctx.idx.delegates, vs, rule)
            key = delegate_key(rule.delegate, vs.namespace)
            if dvs is None and any(
                (o.namespace, o.name) == key and o.spec.hosts for o in ctx.idx.virtual_services
            ):
                why = (
                    f"VirtualService {key[0]}/{key[1]} has hosts, so it cannot be a delegate "
                    "(delegate hosts must be empty)"
                )
            if dvs is None:
                ctx.report(
                    m.VIRTUAL_SERVICE_DELEGATION,
                    vs,
                    f"spec.http[{i}].delegate",
                    f"{why}; this route is ignored",
                    "define a VirtualService without hosts with that name and namespace, and "
                    "export it to this namespace (exportTo empty or naming it)",
                    "Warning",
                )
                continue
            for j, leaf in enumerate(dvs.spec.http):
                _, conflict = merge_matches(list(rule.match), list(leaf.match))
                if conflict:
                    ctx.report(
                        m.VIRTUAL_SERVICE_DELEGATION,
                        dvs,
                        f"spec.http[{j}].match",
                        f"route is never used from VirtualService {vs.namespace}/{vs.name} "
                        f"http[{i}]: its match is not within the root route's match",
                        "a delegate's match must narrow the root's (e.g. a longer uri prefix); "
                        "regex matches cannot be combined",
                        "Warning",
                    )

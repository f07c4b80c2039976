"""Deprecated fields (IST0002): Istio's hand-made list (fault.delay.percent, Sidecar
egressProxy, in ``sidecar.py``) and the other fields Istio's API marks deprecated."""

from __future__ import annotations

from diktyo.control.validate import messages as m
from diktyo.control.validate.context import Context


def _replaced(old: str, new: str) -> str:
    return f"Deprecated: {old} is deprecated; use {new}"


def check(ctx: Context) -> None:
    for vs in ctx.idx.virtual_services:
        for i, rule in enumerate(vs.spec.http):
            base = f"spec.http[{i}]"
            delay = rule.fault.delay if rule.fault is not None else None
            if delay is not None and delay.percent:
                ctx.report(
                    m.DEPRECATED,
                    vs,
                    f"{base}.fault.delay.percent",
                    _replaced("HTTPRoute.fault.delay.percent", "HTTPRoute.fault.delay.percentage"),
                    f"write 'percentage: {{value: {delay.percent}}}'",
                )
            legacy = (
                rule.mirror_percent
                if rule.mirror_percent is not None
                else (rule.mirror_percent_legacy)
            )
            if legacy is not None:
                ctx.report(
                    m.DEPRECATED,
                    vs,
                    f"{base}.mirrorPercent",
                    _replaced("HTTPRoute.mirrorPercent", "HTTPRoute.mirrorPercentage"),
                    f"write 'mirrorPercentage: {{value: {legacy}}}'",
                )
            cors = rule.cors_policy
            if cors is not None and cors.allow_origin:
                ctx.report(
                    m.DEPRECATED,
                    vs,
                    f"{base}.corsPolicy.allowOrigin",
                    _replaced("CorsPolicy.allowOrigin", "CorsPolicy.allowOrigins"),
                    "write 'allowOrigins: [{exact: ORIGIN}]'",
                )
    for dr in ctx.idx.destination_rules:
        policies = []
        if dr.spec.traffic_policy is not None:
            policies.append(("spec.trafficPolicy", dr.spec.traffic_policy))
        for i, s in enumerate(dr.spec.subsets):
            if s.traffic_policy is not None:
                policies.append((f"spec.subsets[{i}].trafficPolicy", s.traffic_policy))
        for path, tp in policies:
            od = tp.outlier_detection
            if od is not None and od.consecutive_errors is not None:
                ctx.report(
                    m.DEPRECATED,
                    dr,
                    f"{path}.outlierDetection.consecutiveErrors",
                    _replaced(
                        "OutlierDetection.consecutiveErrors",
                        "OutlierDetection.consecutive5xxErrors",
                    ),
                    f"write 'consecutive5xxErrors: {od.consecutive_errors}'",
                )

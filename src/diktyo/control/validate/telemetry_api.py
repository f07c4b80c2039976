"""Telemetry checks: what diktyo does not apply (or applies differently), said at the field.

Istio accepts all of these; diktyo loads them and warns so nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any

from diktyo.control.translate.telemetry import literal_value
from diktyo.control.validate import messages as msg
from diktyo.control.validate.context import Context
from diktyo.telemetry.cel import check as cel_check


def check(ctx: Context) -> None:
    telemetries = [r for r in ctx.resources if getattr(r, "kind", "") == "Telemetry"]
    for t in telemetries:
        spec = t.spec
        if spec.target_ref is not None or spec.target_refs:
            field = "spec.targetRef" if spec.target_ref is not None else "spec.targetRefs"
            ctx.report(
                msg.UNSUPPORTED, t, field, "targetRef(s) are not supported by diktyo; this Telemetry is not applied",
                "use 'selector: {matchLabels: ...}' to pick workloads", "Warning",
            )  # fmt: skip
            continue
        _check_fields(ctx, t)


def _check_fields(ctx: Context, t: Any) -> None:
    spec = t.spec
    for i, al in enumerate(spec.access_logging):
        expr = al.filter.expression if al.filter is not None else None
        if expr is not None:
            why = cel_check(expr)
            if why is not None:
                ctx.report(
                    msg.UNSUPPORTED, t, f"spec.accessLogging[{i}].filter.expression",
                    f"filter not supported by diktyo ({why}); requests are logged unfiltered",
                    "use comparisons over response.code, request.method, request.path, "
                    "request.headers['name'], ... joined with && and || (docs/telemetry.md)",
                    "Warning",
                )  # fmt: skip
    for i, tr in enumerate(spec.tracing):
        for name, tag in tr.custom_tags.items():
            if tag.formatter is not None:
                ctx.report(
                    msg.UNSUPPORTED, t, f"spec.tracing[{i}].customTags.{name}.formatter",
                    "formatter tags are not supported by diktyo; tag not added",
                    "use a literal, environment or header tag", "Warning",
                )  # fmt: skip
        for f in ("use_request_id_for_trace_sampling", "enable_istio_tags"):
            if getattr(tr, f) is not None:
                camel = "".join(w.capitalize() if k else w for k, w in enumerate(f.split("_")))
                ctx.report(
                    msg.UNSUPPORTED, t, f"spec.tracing[{i}].{camel}", f"{camel} is not supported by diktyo; ignored",
                    "remove it", "Info",
                )  # fmt: skip
        if tr.disable_context_propagation:
            ctx.report(
                msg.UNSUPPORTED, t, f"spec.tracing[{i}].disableContextPropagation",
                "disableContextPropagation is not supported by diktyo; trace headers are still "
                "propagated", "remove it", "Warning",
            )  # fmt: skip
    for i, m in enumerate(spec.metrics):
        if m.reporting_interval is not None:
            ctx.report(
                msg.UNSUPPORTED, t, f"spec.metrics[{i}].reportingInterval",
                "reportingInterval is not supported by diktyo: metrics are read when scraped",
                "remove it", "Info",
            )  # fmt: skip
        for j, ov in enumerate(m.overrides):
            base = f"spec.metrics[{i}].overrides[{j}]"
            if ov.match is not None and ov.match.custom_metric is not None:
                ctx.report(
                    msg.UNSUPPORTED, t, f"{base}.match.customMetric",
                    "customMetric is not supported by diktyo; override ignored",
                    "match one of Istio's standard metrics with 'metric:'", "Warning",
                )  # fmt: skip
            for tag, op in ov.tag_overrides.items():
                value = op.value if op.operation != "REMOVE" else None
                if value is not None and literal_value(value) is None:
                    ctx.report(
                        msg.UNSUPPORTED, t, f"{base}.tagOverrides.{tag}.value",
                        f"only quoted string values are supported by diktyo, not {value!r}; "
                        "tag not added",
                        "write a constant as a CEL string, e.g. value: \"'canary'\"", "Warning",
                    )  # fmt: skip

"""Per-request tracing for the sidecar: continue or start a trace, propagate it, export spans.

Active only when the mesh configures a collector (``snapshot.mesh.tracing.otlp_endpoint``);
otherwise the hot path pays nothing. Propagation and sampling come from
``diktyo.telemetry.tracing`` (W3C ``traceparent`` + B3, Istio's percentage sampler honouring
incoming decisions); finished sampled spans go to ``diktyo.telemetry.otlp.OtlpExporter``.
Inbound listeners record ``server`` spans, outbound/gateway listeners ``client`` spans, named
like Envoy's (``reviews.default.svc.cluster.local:9080/*``).
"""

from __future__ import annotations

import os
from random import Random
from typing import Any, Literal

from diktyo.core.clock import Clock
from diktyo.snapshot.model import CustomTag, TelemetryPolicy
from diktyo.telemetry.tracing import (
    PROPAGATION_HEADERS,
    Sampler,
    Span,
    extract,
    inject,
    sampling_only,
    start_span,
)


class Tracer:
    """One per runtime; ``exporter`` has ``export(span)`` (an ``OtlpExporter``).

    With a Telemetry API ``policy`` (``snapshot.telemetry``), client spans (outbound, gateway)
    and server spans (inbound) each get their sampling percentage, span reporting switch and
    custom tags (literal, environment variable, request header)."""

    def __init__(
        self,
        sampling_percent: float,
        rng: Random,
        clock: Clock,
        exporter: Any,
        node_id: str,
        policy: TelemetryPolicy | None = None,
    ) -> None:
        self.sampler = Sampler(min(100.0, max(0.0, sampling_percent)))
        self.rng = rng
        self.clock = clock
        self.exporter = exporter
        self.node_id = node_id
        # kind -> (sampler, report spans, custom tags)
        self.kinds: dict[str, tuple[Sampler, bool, tuple[CustomTag, ...]]] = {}
        if policy is not None:
            for kind, tp in (("client", policy.client_tracing), ("server", policy.server_tracing)):
                sampler = Sampler(min(100.0, max(0.0, tp.sampling)))
                self.kinds[kind] = (sampler, tp.span_reporting, tp.custom_tags)

    def begin(
        self,
        headers: dict[str, str],
        kind: str,
        name: str,
        attributes: dict[str, str | int | float | bool],
    ) -> Span:
        """Start the span for a request and rewrite ``headers`` to carry it upstream."""
        parent = extract(headers)
        # a bare decision without trace ids (x-b3-sampled: 1 / b3: 0) forces sampling on or off
        # for a new trace, as Envoy does with Istio's B3 propagation
        forced = sampling_only(headers) if parent is None else None
        span_kind: Literal["server", "client"] = "server" if kind == "server" else "client"
        kind = span_kind
        sampler = self.sampler
        per_kind = self.kinds.get(kind)
        if per_kind is not None:
            sampler, report, tags = per_kind
            if tags:
                attributes = {**attributes, **_tag_values(tags, headers)}
            if not report:
                attributes = {**attributes, _NO_REPORT: True}
        span = start_span(
            parent,
            name,
            span_kind,
            sampler,
            self.rng,
            self.clock,
            attributes,
            sampled=forced,
        )
        for h in PROPAGATION_HEADERS:
            if h != "x-request-id":
                headers.pop(h, None)
        for k, v in inject(span):
            if k != "x-request-id":  # the proxy already set or kept the request id
                headers[k] = v
        return span

    def end(self, span: Span, status: int, flags: str, cluster: str) -> None:
        span.attributes["upstream_cluster"] = cluster
        span.finish(self.clock, status, flags)
        if span.sampled and not span.attributes.pop(_NO_REPORT, False):
            self.exporter.export(span)


_NO_REPORT = "diktyo.no_report"  # disableSpanReporting: the span propagates, is never exported


def _tag_values(tags: tuple[CustomTag, ...], headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tags:
        if t.kind == "literal":
            out[t.name] = t.value
        elif t.kind == "environment":
            out[t.name] = os.environ.get(t.value, t.default)
        else:
            out[t.name] = headers.get(t.value, t.default)
    return out

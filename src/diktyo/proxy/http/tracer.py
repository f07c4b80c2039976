"""Per-request tracing for the sidecar: continue or start a trace, propagate it, export spans.

Active only when the mesh configures a collector (``snapshot.mesh.tracing.otlp_endpoint``);
otherwise the hot path pays nothing. Propagation and sampling come from
``diktyo.telemetry.tracing`` (W3C ``traceparent`` + B3, Istio's percentage sampler honouring
incoming decisions); finished sampled spans go to ``diktyo.telemetry.otlp.OtlpExporter``.
Inbound listeners record ``server`` spans, outbound/gateway listeners ``client`` spans, named
like Envoy's (``reviews.default.svc.cluster.local:9080/*``).
"""

from __future__ import annotations

from random import Random
from typing import Any

from diktyo.core.clock import Clock
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
    """One per runtime; ``exporter`` has ``export(span)`` (an ``OtlpExporter``)."""

    def __init__(
        self, sampling_percent: float, rng: Random, clock: Clock, exporter: Any, node_id: str
    ) -> None:
        self.sampler = Sampler(min(100.0, max(0.0, sampling_percent)))
        self.rng = rng
        self.clock = clock
        self.exporter = exporter
        self.node_id = node_id

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
        span = start_span(
            parent,
            name,
            "server" if kind == "server" else "client",
            self.sampler,
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
        if span.sampled:
            self.exporter.export(span)

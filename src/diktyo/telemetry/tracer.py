"""The sidecar's tracer: Istio's span names and attributes on top of ``tracing`` and ``otlp``.

One per sidecar. Per request (only when the request is traced at all):

    span = tracer.start(headers, "client", host, port, method, path)   # continues or starts a trace
    upstream_headers.extend(inject(span))                               # W3C + B3 + x-request-id
    ...
    tracer.finish(span, status, flags, upstream_cluster, upstream_host)  # exports if sampled

Unsampled spans cost two random draws and one small object; nothing is exported for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from random import Random

from diktyo.core.clock import SYSTEM_CLOCK, Clock, make_random
from diktyo.telemetry.istio_metrics import WorkloadInfo
from diktyo.telemetry.otlp import OtlpExporter
from diktyo.telemetry.tracing import (
    Sampler,
    Span,
    SpanKind,
    extract,
    request_id_of,
    span_name,
    start_span,
)


class Tracer:
    """Starts spans with Istio's attributes and hands sampled, finished spans to an exporter."""

    def __init__(
        self,
        me: WorkloadInfo,
        node_id: str,
        sampling_percent: float = 1.0,
        exporter: OtlpExporter | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: Random | None = None,
    ) -> None:
        self.me = me
        self.node_id = node_id
        self.sampler = Sampler(sampling_percent)
        self.exporter = exporter
        self.clock = clock
        self.rng = rng or make_random()
        self._base: dict[str, str | int | float | bool] = {
            "node_id": node_id,
            "component": "proxy",
            "istio.canonical_service": me.canonical_service,
            "istio.canonical_revision": me.canonical_revision,
            "istio.namespace": me.namespace,
        }

    @property
    def service_name(self) -> str:
        """Istio's trace service name: ``<canonical service>.<namespace>``."""
        return f"{self.me.canonical_service}.{self.me.namespace}"

    def start(
        self,
        headers: Mapping[str, str],
        kind: SpanKind,
        host: str,
        port: int | None,
        method: str,
        path: str,
        protocol: str = "HTTP/1.1",
    ) -> Span:
        """A span continuing the request's trace (or a new one); ``headers`` lower-case."""
        attrs = dict(self._base)
        attrs["http.method"] = method
        attrs["http.url"] = f"http://{host}{path}"
        attrs["http.protocol"] = protocol
        ctx = extract(headers)
        span = start_span(
            ctx, span_name(host, port), kind, self.sampler, self.rng, self.clock, attrs
        )
        if ctx is None:
            span.request_id = request_id_of(headers) or span.request_id
        if span.request_id:
            span.attributes["guid:x-request-id"] = span.request_id
        return span

    def finish(
        self,
        span: Span,
        status_code: int,
        response_flags: str = "-",
        upstream_cluster: str = "",
        upstream_host: str = "",
    ) -> None:
        """End ``span`` and export it if sampled (never blocks, never raises)."""
        if upstream_cluster:
            span.attributes["upstream_cluster"] = upstream_cluster
        if upstream_host:
            span.attributes["peer.address"] = upstream_host
        span.finish(self.clock, status_code, response_flags)
        if span.sampled and self.exporter is not None:
            self.exporter.export(span)

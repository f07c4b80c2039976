"""Per-request tracing for the sidecar: continue or start a trace, propagate it, export spans.

Active only when the mesh configures a collector (``snapshot.mesh.tracing.otlp_endpoint``);
otherwise the hot path pays nothing. Propagation and sampling come from
``diktyo.telemetry.tracing`` (W3C ``traceparent`` + B3, Istio's percentage sampler honouring
incoming decisions); finished sampled spans go to ``diktyo.telemetry.otlp.OtlpExporter``.
Inbound listeners record ``server`` spans, outbound/gateway listeners ``client`` spans, named
like Envoy's (``reviews.default.svc.cluster.local:9080/*``).

Span attributes are the tags Envoy and Istio put on a sidecar's spans, with their names and
string values: Istio's ``istio.canonical_service`` / ``istio.canonical_revision`` /
``istio.mesh_id`` / ``istio.namespace`` / ``istio.cluster_id`` (literal custom tags from the
proxy's metadata), Envoy's ``node_id``, ``zone``, ``component: proxy`` (all built once per
snapshot, :func:`static_tags`), then per request ``guid:x-request-id``, ``http.url``
(``scheme://authority/path``, path cut at 256 characters), ``http.method``, ``http.protocol``,
``downstream_cluster`` and ``user_agent`` (``-`` when absent), ``peer.address`` (the downstream
IP), and when the request ends ``http.status_code``, ``response_flags``, ``request_size``,
``response_size``, ``upstream_cluster`` and ``upstream_cluster.name`` (set only when a cluster
was chosen, as Envoy does).
"""

from __future__ import annotations

import os
from random import Random
from typing import Any, Literal

from diktyo.core.clock import Clock
from diktyo.snapshot.model import CustomTag, Node, TelemetryPolicy
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
        node: Node | None = None,
        mesh_id: str = "",
    ) -> None:
        self.sampler = Sampler(min(100.0, max(0.0, sampling_percent)))
        self.rng = rng
        self.clock = clock
        self.exporter = exporter
        self.node_id = node_id
        self.static = static_tags(node_id, node, mesh_id)
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

    def begin_request(self, head: Any, peer: str, kind: str, name: str) -> Span:
        """:meth:`begin` with Envoy's request tags; ``head`` is the ``RequestHead``.

        Tags are built only for a sampled span (the others are never exported), so a request
        that is not traced pays for the sampling decision and the propagation headers only."""
        h = head.headers
        span = self.begin(h, kind, name, {})
        if span.sampled:
            attrs = self.static.copy()
            attrs["guid:x-request-id"] = h.get("x-request-id", "")
            path = head.path[:MAX_PATH_TAG_LENGTH]
            attrs["http.url"] = f"{head.scheme}://{head.authority}{path}"
            attrs["http.method"] = head.method
            attrs["http.protocol"] = _PROTOCOLS.get(head.version) or f"HTTP/{head.version}"
            attrs["downstream_cluster"] = h.get("x-envoy-downstream-service-cluster") or "-"
            attrs["user_agent"] = h.get("user-agent") or "-"
            attrs["peer.address"] = peer
            if span.attributes:  # the Telemetry API's custom tags win over the standard ones
                attrs.update(span.attributes)
            span.attributes = attrs
        return span

    def responded(self, span: Span) -> None:
        """The whole response is about to be written: this is the span's end time."""
        if span.sampled:
            span.end_ns = max(span.start_ns, int(self.clock.time() * 1e9))

    def end(
        self,
        span: Span,
        status: int,
        flags: str,
        cluster: str,
        req_bytes: int | None = None,
        resp_bytes: int | None = None,
    ) -> None:
        if not span.sampled:  # never exported
            return
        a = span.attributes
        if cluster:  # Envoy tags the cluster only when one was chosen
            a["upstream_cluster"] = cluster
            a["upstream_cluster.name"] = cluster  # observability name: no alt_stat_name here
        if req_bytes is not None:
            a["request_size"] = str(req_bytes)
        if resp_bytes is not None:
            a["response_size"] = str(resp_bytes)
        span.finish(self.clock, status, flags)
        a["http.status_code"] = str(status)  # Envoy's tags are strings
        if not a.pop(_NO_REPORT, False):
            self.exporter.export(span)


MAX_PATH_TAG_LENGTH = 256  # Envoy's default tracing.max_path_tag_length
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2", "3": "HTTP/3"}


def static_tags(
    node_id: str, node: Node | None, mesh_id: str
) -> dict[str, str | int | float | bool]:
    """The tags every span of this proxy carries (built once per snapshot).

    Istio adds its ``istio.*`` tags as literal custom tags from the proxy's metadata:
    canonical service and revision from the pod labels (``unknown`` / ``latest`` when absent),
    the mesh id (Istio's default is the trust domain), the namespace and the cluster id.
    Envoy adds ``node_id``, ``zone`` (the node's locality zone, empty when none) and
    ``component: proxy``."""
    from diktyo.telemetry.istio_metrics import WorkloadInfo
    from diktyo.telemetry.stats import UNKNOWN

    tags: dict[str, str | int | float | bool] = {
        "node_id": node_id,
        "zone": "",
        "component": "proxy",
    }
    if node is not None:
        info = WorkloadInfo.from_labels(node.workload, node.namespace, node.labels)
        tags["istio.canonical_service"] = info.canonical_service
        tags["istio.canonical_revision"] = info.canonical_revision
        tags["istio.mesh_id"] = mesh_id or node.trust_domain or UNKNOWN
        tags["istio.namespace"] = node.namespace or "default"
        tags["istio.cluster_id"] = info.cluster
    return tags


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

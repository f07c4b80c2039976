"""Telemetry as filters: Istio's request metrics, the access log and trace spans.

``StatsFilter`` records ``istio_requests_total`` and friends when a stream is done (labels
per peer: the mTLS/metadata peer of an inbound request, else the upstream host's workload);
``AccessLogFilter`` writes the access log line; ``TracingFilter`` starts a span once the
destination is known (chain stage *route*, so the trace headers it writes go upstream and to
mirrors) and ends it with the response status and flags; a request answered before that (no
route, a decode filter's local reply) gets its span when it completes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diktyo.proxy.codec.events import RequestHead
from diktyo.proxy.filters.contract import CONTINUE, FilterCallbacks, FilterStatus, HttpFilter


def span_name_for(service: str, port: int | None, authority: str) -> str:
    """Envoy's operation name: ``reviews.default.svc.cluster.local:9080/*``."""
    if service:
        return f"{service}:{port}/*" if port else f"{service}/*"
    return f"{authority}/*"


class StatsFilter(HttpFilter):
    """Istio standard metrics, one ``record`` per request."""

    __slots__ = ("by_host", "reporter", "rt")

    def __init__(self, rt: Any, reporter: str) -> None:
        self.rt = rt
        self.reporter = reporter
        # upstream Host -> its HTTP peer labels, for this snapshot (a host belongs to one
        # cluster, so the host alone is the key: no (reporter, cluster, host) tuple per request)
        self.by_host: dict[Any, Any] = {}

    def on_complete(self, cb: FilterCallbacks, flags: str, duration_ms: float) -> None:
        self.count(
            cb.peer, cb.host, cb.cstate, cb.grpc, cb.grpc_status, cb.grpc_msgs, cb.status,
            cb.req_bytes, cb.resp_bytes, flags, duration_ms,
        )  # fmt: skip

    def count(
        self,
        labels: Any,
        host: Any,
        cstate: Any,
        grpc: bool,
        grpc_status: str,
        msgs: Any,
        status: int,
        req_bytes: int,
        resp_bytes: int,
        flags: str,
        duration_ms: float,
    ) -> None:
        """``on_complete`` with the stream's fields as arguments: the HTTP/1.1 stream calls it
        directly (compiled: one native call, its fields read natively; issue 11, `lean`)."""
        rt = self.rt
        if labels is None:  # (not an inbound peer's labels: the upstream host's)
            if grpc:  # request_protocol="grpc"
                labels = rt.labels_for(self.reporter, cstate, host, "grpc")
            else:
                labels = self.by_host.get(host)
                if labels is None:
                    labels = rt.labels_for(self.reporter, cstate, host)
                    if host is not None:
                        self.by_host[host] = labels
        rt.record(labels, status, flags, duration_ms, req_bytes, resp_bytes, grpc_status)
        if msgs is not None:
            rt.stats.metrics.record_messages(
                labels, status, flags, grpc_status, msgs[0].count, msgs[1].count
            )


class AccessLogFilter(HttpFilter):
    """The access log (``proxy.access_log``): one line per request."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[..., None]) -> None:
        self.write = write

    def on_complete(self, cb: FilterCallbacks, flags: str, duration_ms: float) -> None:
        self.write(cb, flags, duration_ms)


class TracingFilter(HttpFilter):
    """A span per request: ``server`` on inbound listeners, ``client`` elsewhere."""

    __slots__ = ("inbound", "service", "tracer")

    def __init__(self, tracer: Any, inbound: bool, service: str) -> None:
        self.tracer = tracer
        self.inbound = inbound
        self.service = service

    def decode_headers(self, cb: FilterCallbacks, head: RequestHead) -> FilterStatus:
        tracer = self.tracer
        if self.inbound:
            kind = "server"
            name = span_name_for(self.service, cb.service_port(), head.authority)
        else:
            kind = "client"
            wc = cb.dest.wc
            port = wc.port or cb.cstate.cluster.port or None
            name = span_name_for(wc.host, port, cb.routing_authority())
        span = tracer.begin_request(head, cb.downstream_address(), kind, name)
        cb.set_state("span", span)
        cb.set_state("tracer", tracer)  # the stream stamps the span's end before its last write
        return CONTINUE

    def on_complete(self, cb: FilterCallbacks, flags: str, duration_ms: float) -> None:
        span = cb.get_state("span")
        if span is None:
            # answered before a destination was chosen (404 NR, a local reply of a decode
            # filter: authz 403, fault abort; a bad request): no span began, as the route
            # stage never ran. Envoy traces every request its connection manager sees, so it
            # gets one now, dated back to the request's start.
            span = self._late_span(cb, duration_ms)
        cs = cb.cstate
        cluster = cs.cluster.name if cs is not None else ""
        self.tracer.end(span, cb.status, flags, cluster, cb.req_bytes, cb.resp_bytes)

    def _late_span(self, cb: FilterCallbacks, duration_ms: float) -> Any:
        head = cb.head
        if self.inbound:
            kind = "server"
            name = span_name_for(self.service, cb.service_port(), head.authority)
        else:  # no cluster: named after the authority asked for
            kind = "client"
            name = span_name_for("", None, cb.routing_authority() or head.authority)
        span = self.tracer.begin_request(head, cb.downstream_address(), kind, name)
        if span.sampled:
            span.start_ns = max(0, span.start_ns - int(duration_ms * 1e6))
        return span

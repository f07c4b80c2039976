"""Every stat the sidecar exports, declared in one place (like Envoy's ``ALL_CLUSTER_STATS``).

Theory of operation
-------------------
A :class:`StatsList` is one scope's declaration: an exposition prefix, its label names and
its :class:`Stat` entries (key, kind, help). The lists below are the only place a stat name,
type or HELP text is written down:

- :data:`SERVER_STATS`  ``envoy_http_*`` (the HTTP connection manager and the listeners)
- :data:`CLUSTER_STATS` ``envoy_cluster_*{cluster_name=...}`` (pools, retries, kernels)
- :data:`PROXY_STATS`   ``diktyo_proxy_*`` (snapshots applied / rejected)
- :data:`ISTIO_HTTP_STATS` ``istio_request*`` (Istio's HTTP metrics); their series live in
  ``istio_metrics.IstioMetrics`` as rows of a count, sums and histogram buckets (a histogram is
  not a counter), but name, type and HELP come from here
- :data:`ISTIO_TCP_STATS` ``istio_tcp_*`` (Istio's TCP metrics), blocks like the others, one
  per (peer, response flags)

One counting mechanism: a scope's values are a *block*, a plain ``dict`` from key to number
made by :meth:`StatsList.block` with every declared counter present at 0. The hot path is
``block[key] += 1`` (CPython specialises both halves for an exact ``dict``); an undeclared key
raises ``KeyError`` there, so a typo cannot create a stat nobody declared. A labelled block's
label text is rendered and escaped once, when the block is made (:func:`label_text`), never
per scrape and never per increment. :func:`collect` turns blocks into exposition text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from diktyo.telemetry.exposition import format_value, header, render_labels

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
_KINDS = (COUNTER, GAUGE, HISTOGRAM)
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Stat:
    """One declared stat: the key code uses, its type and its HELP text."""

    key: str
    kind: str
    help: str
    always: bool = False  # shown at 0 too (otherwise a counter appears once it has counted)
    api: str = ""  # Istio's Telemetry API metric name (MetricSelector), for Istio's metrics


class StatsList:
    """A scope's declared stats: exposition ``prefix`` + key is the metric name."""

    __slots__ = ("by_key", "counters", "labelnames", "prefix", "stats")

    def __init__(self, prefix: str, labelnames: Sequence[str], stats: Sequence[Stat]) -> None:
        for ln in labelnames:
            if not _LABEL.match(ln) or ln.startswith("__"):
                raise ValueError(
                    f"invalid label name {ln!r} for {prefix}*: use [a-zA-Z_][a-zA-Z0-9_]*"
                )
        for s in stats:
            if not _NAME.match(prefix + s.key):
                raise ValueError(
                    f"invalid metric name {prefix + s.key!r}: use [a-zA-Z_:][a-zA-Z0-9_:]*"
                )
            if s.kind not in _KINDS:
                raise ValueError(f"{prefix + s.key}: kind {s.kind!r} is not one of {_KINDS}")
        self.prefix = prefix
        self.labelnames = tuple(labelnames)
        self.stats = tuple(stats)
        self.by_key = {s.key: s for s in self.stats}
        if len(self.by_key) != len(self.stats):
            raise ValueError(f"{prefix}*: a stat is declared twice; declare each once")
        self.counters = tuple(s.key for s in self.stats if s.kind == COUNTER)

    def name(self, key: str) -> str:
        return self.prefix + key

    def block(self) -> dict[str, int]:
        """A fresh block: every declared counter at 0 (gauges appear when first set)."""
        return dict.fromkeys(self.counters, 0)

    def __contains__(self, key: object) -> bool:
        return key in self.by_key


def label_text(slist: StatsList, values: Sequence[str]) -> str:
    """``name="value",...`` for one labelled block, escaped once (the only escaping path)."""
    return render_labels(slist.labelnames, values)


def collect(
    out: list[str], slist: StatsList, rows: Iterable[tuple[str, Mapping[str, float]]]
) -> None:
    """Append one family per declared stat, in declaration order.

    ``rows`` are (label text, block). A counter shows once it is non-zero (as Envoy's
    ``usedonly``), so a cluster that never retried adds no retry line, unless it is declared
    ``always``. Gauges show when set. Keys nobody declared (only possible through ``block.get(k, 0) + 1``) follow, so nothing counted
    is lost, with a HELP line that says where to declare them."""
    rows = list(rows)
    for st in slist.stats:
        key = st.key
        hide_zero = st.kind == COUNTER and not st.always
        lines = []
        for labels, block in rows:
            v = block.get(key)
            if v is None or (hide_zero and not v):
                continue
            lines.append(_line(slist.prefix + key, labels, v))
        if lines:
            header(out, slist.prefix + key, st.kind, st.help)
            out.extend(lines)
    extra = sorted({k for _, b in rows for k in b if k not in slist.by_key})
    for key in extra:
        header(
            out, slist.prefix + key, COUNTER,
            f"Undeclared stat {key}: declare it in diktyo.telemetry.stats.",
        )  # fmt: skip
        out.extend(_line(slist.prefix + key, lbl, b[key]) for lbl, b in rows if key in b)


def _line(name: str, labels: str, v: float) -> str:
    if labels:
        return f"{name}{{{labels}}} {format_value(v)}\n"
    return f"{name} {format_value(v)}\n"


# --------------------------------------------------------------------------- the lists

SERVER_STATS = StatsList("envoy_http_", (), (
    Stat("downstream_cx_total", COUNTER, "Downstream connections accepted.", always=True),
    Stat("downstream_rq_total", COUNTER, "Downstream requests (including malformed ones).",
         always=True),
    Stat("downstream_cx_http2_total", COUNTER, "Downstream HTTP/2 connections accepted."),
    Stat("downstream_cx_idle_timeout", COUNTER,
         "Downstream connections closed by the idle timeout (upgraded WebSocket tunnels)."),
    Stat("downstream_rq_400", COUNTER, "Malformed requests answered 400 by the codec."),
    Stat("downstream_rq_426", COUNTER, "HTTP/1.0 requests refused with 426 (accept_http_10 off)."),
    Stat("downstream_rq_431", COUNTER, "Requests refused with 431: request headers too large."),
    Stat("downstream_rq_501", COUNTER, "Requests refused with 501: unsupported transfer-encoding."),
    Stat("downstream_rq_505", COUNTER, "Requests refused with 505: HTTP version not supported."),
    Stat("downstream_rq_header_timeout", COUNTER,
         "Requests answered 408 because their headers did not arrive in time."),
    Stat("downstream_rq_internal_error", COUNTER,
         "Requests answered 500 because of a bug in the proxy (logged with a traceback)."),
    Stat("downstream_cx_rbac_denied", COUNTER,
         "Inbound TCP connections denied by an AuthorizationPolicy."),
    Stat("downstream_cx_refused_peer_authn", COUNTER,
         "Inbound connections refused by PeerAuthentication (STRICT mTLS, no client certificate)."),
    Stat("rbac_denied", COUNTER, "Inbound requests denied by an AuthorizationPolicy (403)."),
    Stat("jwt_authn_denied", COUNTER, "Inbound requests denied by RequestAuthentication (401)."),
    Stat("path_rejected", COUNTER, "Inbound requests whose path failed normalization (400)."),
    Stat("security_denied", COUNTER, "Inbound requests denied by another security check."),
    Stat("access_log_lines_written", COUNTER, "Access log lines written or buffered."),
    Stat("access_log_lines_dropped", COUNTER,
         "Access log lines dropped because the reader was not keeping up."),
))  # fmt: skip

CLUSTER_STATS = StatsList("envoy_cluster_", ("cluster_name",), (
    Stat("upstream_cx_total", COUNTER, "Upstream connections opened."),
    Stat("upstream_cx_http2_total", COUNTER, "Upstream HTTP/2 connections opened."),
    Stat("upstream_cx_connect_fail", COUNTER, "Upstream connection attempts that failed."),
    Stat("upstream_cx_protocol_error", COUNTER,
         "Upstream connections closed because the upstream broke the HTTP/2 protocol."),
    Stat("upstream_cx_connect_timeout", COUNTER, "Upstream connection attempts that timed out."),
    Stat("upstream_cx_destroy", COUNTER, "Upstream connections closed."),
    Stat("upstream_cx_overflow", COUNTER,
         "Connections refused because the cluster's connection limit was reached."),
    Stat("upstream_cx_pool_drained", COUNTER,
         "Upstream connections retired because the cluster's TLS or pool settings changed."),
    Stat("upstream_cx_none_healthy", COUNTER,
         "Requests that found no healthy host (503 UH)."),
    Stat("ssl_handshake", COUNTER, "Upstream TLS handshakes completed (full or resumed)."),
    Stat("ssl_session_reused", COUNTER, "Upstream TLS handshakes that resumed a session."),
    Stat("upstream_rq_total", COUNTER, "Upstream requests."),
    Stat("upstream_rq_5xx", COUNTER, "Upstream requests that ended in a 5xx or a gateway error."),
    Stat("upstream_rq_pending_overflow", COUNTER,
         "Requests that overflowed the connection pool or pending queue (circuit breaker, UO)."),
    Stat("upstream_rq_retry", COUNTER, "Request retries."),
    Stat("upstream_rq_retry_overflow", COUNTER,
         "Retries not attempted because of circuit breaking or the retry budget."),
    Stat("upstream_rq_timeout", COUNTER, "Requests that timed out waiting for a response."),
    Stat("upstream_rq_keepalive_race_retry", COUNTER,
         "Requests retried on a new connection because a reused one closed before answering."),
    Stat("upstream_rq_protocol_error", COUNTER,
         "Upstream responses that were malformed (answered 502 downstream)."),
    Stat("lb_healthy_panic", COUNTER,
         "Requests load balanced in panic mode (fewer healthy hosts than minHealthPercent)."),
    Stat("outlier_detection_ejections_enforced_total", COUNTER,
         "Hosts ejected by outlier detection."),
    Stat("outlier_detection_ejections_overflow", COUNTER,
         "Ejections skipped because maxEjectionPercent was reached."),
    Stat("outlier_detection_ejections_detected_consecutive_5xx", COUNTER,
         "Hosts that reached consecutive5xxErrors (ejected or not)."),
    Stat("outlier_detection_ejections_enforced_consecutive_5xx", COUNTER,
         "Hosts ejected for consecutive5xxErrors."),
    Stat("outlier_detection_ejections_detected_consecutive_gateway_failure", COUNTER,
         "Hosts that reached consecutiveGatewayErrors (ejected or not)."),
    Stat("outlier_detection_ejections_enforced_consecutive_gateway_failure", COUNTER,
         "Hosts ejected for consecutiveGatewayErrors."),
    Stat("upstream_cx_active", GAUGE, "Active upstream connections."),
    Stat("upstream_rq_active", GAUGE, "Active upstream requests."),
    Stat("outlier_detection_ejections_active", GAUGE, "Hosts currently ejected."),
))  # fmt: skip

LISTENER_STATS = StatsList("envoy_listener_", (), (
    Stat("ssl_handshake", COUNTER, "Inbound mTLS handshakes completed (full or resumed)."),
    Stat("ssl_session_reused", COUNTER, "Inbound mTLS handshakes that resumed a session."),
))

PROXY_STATS = StatsList("diktyo_proxy_", (), (
    Stat("config_applied_total", COUNTER, "Snapshots applied (ACK)."),
    Stat("config_rejected_total", COUNTER, "Snapshots rejected (NACK)."),
))  # fmt: skip

# Istio's full label set, in Istio's order.
LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
PER_REQUEST_LABELS = ("response_code", "grpc_response_status", "response_flags")
UNKNOWN = "unknown"

# Istio's standard metrics (``api``: the Telemetry API's metric name, for metric overrides)
ISTIO_HTTP_STATS = StatsList("istio_", LABEL_NAMES, (
    Stat("requests_total", COUNTER, "Requests handled by an Istio proxy.", api="REQUEST_COUNT"),
    Stat("request_duration_milliseconds", HISTOGRAM, "Duration of requests in milliseconds.",
         api="REQUEST_DURATION"),
    Stat("request_bytes", HISTOGRAM, "HTTP request body sizes in bytes.", api="REQUEST_SIZE"),
    Stat("response_bytes", HISTOGRAM, "HTTP response body sizes in bytes.", api="RESPONSE_SIZE"),
))  # fmt: skip

# gRPC streams: messages per request, with the HTTP series' labels (Istio's names)
ISTIO_GRPC_STATS = StatsList("istio_", LABEL_NAMES, (
    Stat("request_messages_total", COUNTER, "gRPC messages sent by clients (request streams).",
         always=True, api="GRPC_REQUEST_MESSAGES"),
    Stat("response_messages_total", COUNTER, "gRPC messages sent by servers (response streams).",
         always=True, api="GRPC_RESPONSE_MESSAGES"),
))  # fmt: skip

# label names of a TCP series: Istio's, without the HTTP-only response_code and grpc status
_TCP_LABELS = tuple(n for n in LABEL_NAMES if n not in ("response_code", "grpc_response_status"))

ISTIO_TCP_STATS = StatsList("istio_tcp_", _TCP_LABELS, (
    Stat("sent_bytes_total", COUNTER, "Bytes sent during response in case of a TCP connection.",
         always=True, api="TCP_SENT_BYTES"),
    Stat("received_bytes_total", COUNTER,
         "Bytes received during request in case of a TCP connection.",
         always=True, api="TCP_RECEIVED_BYTES"),
    Stat("connections_opened_total", COUNTER, "TCP connections opened.",
         always=True, api="TCP_OPENED_CONNECTIONS"),
    Stat("connections_closed_total", COUNTER, "TCP connections closed.",
         always=True, api="TCP_CLOSED_CONNECTIONS"),
))  # fmt: skip

# Telemetry API metric name -> exposition name
ISTIO_NAMES: dict[str, str] = {
    st.api: sl.name(st.key) for sl in (ISTIO_HTTP_STATS, ISTIO_GRPC_STATS, ISTIO_TCP_STATS) for st in sl.stats
}
_ISTIO_BY_API = {
    st.api: (sl, st)
    for sl in (ISTIO_HTTP_STATS, ISTIO_GRPC_STATS, ISTIO_TCP_STATS)
    for st in sl.stats
}

ALL_LISTS: tuple[StatsList, ...] = (
    SERVER_STATS, CLUSTER_STATS, PROXY_STATS, ISTIO_HTTP_STATS, ISTIO_GRPC_STATS, ISTIO_TCP_STATS,
)  # fmt: skip


def istio_header(out: list[str], api: str) -> None:
    """HELP/TYPE of one Istio metric by its Telemetry API name (``REQUEST_COUNT``...)."""
    sl, st = _ISTIO_BY_API[api]
    header(out, sl.name(st.key), st.kind, st.help)

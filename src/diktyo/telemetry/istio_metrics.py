"""Istio's standard metrics (names, labels, buckets) with a hot path of plain integer increments.

Theory of operation
-------------------
Istio's labels split in two: those fixed for a (reporter, source, destination) pair — 22 of
them — and those that vary per request (``response_code``, ``grpc_response_status``,
``response_flags``). The sidecar builds a :class:`PeerLabels` once per pair (when a snapshot
is applied or a connection's peer is known) and interns it with :meth:`IstioMetrics.peer`,
getting a :class:`PeerKey` whose label text is rendered once. Per request it calls
:meth:`IstioMetrics.record`, which finds one list per (peer, code, flags) series and bumps a
count, three sums and three histogram buckets (bucket index by ``bucket_index``). Aggregation into
cumulative buckets and all text formatting happen only at scrape time (:meth:`collect`).

Not thread-safe by design: one event loop per sidecar process owns its ``IstioMetrics``.

Buckets: Istio's stats filter uses Envoy's default histogram buckets for all three histograms
(durations in milliseconds, sizes in bytes) unless ``sidecar.istio.io/statsHistogramBuckets``
overrides them; both are constructor arguments here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from diktyo.security.spiffe import SCHEME, SpiffeError, SpiffeId
from diktyo.telemetry.exposition import (
    escape_label_value,
    format_bound,
    format_value,
    histogram_lines,
)
from diktyo.telemetry.stats import (
    ISTIO_GRPC_STATS,
    ISTIO_HTTP_STATS,
    ISTIO_NAMES,
    ISTIO_TCP_STATS,
    LABEL_NAMES,
    PER_REQUEST_LABELS,
    UNKNOWN,
    collect,
    istio_header,
)

# Envoy's default histogram buckets (Istio's defaults for duration and size histograms).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
DURATION_BUCKETS_MS = DEFAULT_BUCKETS
BYTES_BUCKETS = DEFAULT_BUCKETS

# names, types, HELP and label names are declared once, in ``diktyo.telemetry.stats``
REQUESTS_TOTAL = ISTIO_NAMES["REQUEST_COUNT"]
REQUEST_DURATION = ISTIO_NAMES["REQUEST_DURATION"]
REQUEST_BYTES = ISTIO_NAMES["REQUEST_SIZE"]
RESPONSE_BYTES = ISTIO_NAMES["RESPONSE_SIZE"]
TCP_SENT = ISTIO_NAMES["TCP_SENT_BYTES"]
TCP_RECEIVED = ISTIO_NAMES["TCP_RECEIVED_BYTES"]
TCP_OPENED = ISTIO_NAMES["TCP_OPENED_CONNECTIONS"]
TCP_CLOSED = ISTIO_NAMES["TCP_CLOSED_CONNECTIONS"]
REQUEST_MESSAGES = ISTIO_NAMES["GRPC_REQUEST_MESSAGES"]  # gRPC messages (streams)
RESPONSE_MESSAGES = ISTIO_NAMES["GRPC_RESPONSE_MESSAGES"]


CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
PEER_METADATA_HEADER = "x-diktyo-peer-metadata"


# --------------------------------------------------------------------------- label values


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """What Istio knows about one side of a request (from node metadata / peer exchange)."""

    name: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    principal: str = UNKNOWN
    cluster: str = UNKNOWN

    @classmethod
    def from_labels(
        cls,
        name: str,
        namespace: str,
        labels: Mapping[str, str],
        principal: str = "",
        cluster: str = "",
    ) -> WorkloadInfo:
        """Derive app/version/canonical service/revision from pod labels like Istio does."""
        canon = next((labels[k] for k in CANONICAL_NAME_LABELS if labels.get(k)), name or UNKNOWN)
        rev = next((labels[k] for k in CANONICAL_REVISION_LABELS if labels.get(k)), "latest")
        return cls(
            name=name or UNKNOWN,
            namespace=namespace or UNKNOWN,
            app=labels.get("app") or UNKNOWN,
            version=labels.get("version") or UNKNOWN,
            canonical_service=canon,
            canonical_revision=rev,
            principal=principal or UNKNOWN,
            cluster=cluster or labels.get("topology.istio.io/cluster") or UNKNOWN,
        )

    @classmethod
    def from_principal(cls, principal: str) -> WorkloadInfo:
        """What an mTLS peer's SPIFFE id alone tells (namespace), when no metadata came along."""
        try:
            ns = SpiffeId.parse(principal).namespace if principal.startswith(SCHEME) else UNKNOWN
        except SpiffeError:
            ns = UNKNOWN
        return cls(namespace=ns, principal=principal or UNKNOWN)

    def encode(self) -> str:
        """Compact header value for :data:`PEER_METADATA_HEADER` (base64url of JSON)."""
        raw = json.dumps([getattr(self, f.name) for f in fields(self)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> WorkloadInfo | None:
        """Parse :meth:`encode` output from an untrusted header; ``None`` if malformed."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            items = json.loads(raw)
        except (ValueError, TypeError):
            return None
        names = [f.name for f in fields(cls)]
        if not isinstance(items, list) or len(items) != len(names):
            return None
        if not all(isinstance(v, str) and len(v) <= 256 for v in items):
            return None
        return cls(**dict(zip(names, items, strict=True)))


def _service_parts(host: str) -> tuple[str, str]:
    parts = host.split(".")
    if len(parts) >= 2 and not host.replace(".", "").isdigit():
        return parts[0], parts[1]
    return host or UNKNOWN, UNKNOWN


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """The 22 labels fixed for one (reporter, source, destination) pair; "unknown" if missing."""

    reporter: str = "source"
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "http"
    connection_security_policy: str = UNKNOWN

    @classmethod
    def build(
        cls,
        reporter: str,
        source: WorkloadInfo | None,
        destination: WorkloadInfo | None,
        service_host: str = "",
        protocol: str = "http",
        mtls: bool = False,
    ) -> PeerLabels:
        """Istio's label rules for either reporter.

        ``connection_security_policy`` is "unknown" for ``reporter="source"`` and
        "mutual_tls"/"none" for ``reporter="destination"``, as in Istio.
        """
        s = source or WorkloadInfo()
        d = destination or WorkloadInfo()
        svc_name, svc_ns = _service_parts(service_host)
        if reporter == "source":
            policy = UNKNOWN
        else:
            policy = "mutual_tls" if mtls else "none"
        return cls(
            reporter=reporter,
            source_workload=s.name,
            source_canonical_service=s.canonical_service,
            source_canonical_revision=s.canonical_revision,
            source_workload_namespace=s.namespace,
            source_principal=s.principal if mtls else UNKNOWN,
            source_app=s.app,
            source_version=s.version,
            source_cluster=s.cluster,
            destination_workload=d.name,
            destination_workload_namespace=d.namespace,
            destination_principal=d.principal if mtls else UNKNOWN,
            destination_app=d.app,
            destination_version=d.version,
            destination_service=service_host or UNKNOWN,
            destination_service_name=svc_name,
            destination_service_namespace=svc_ns if svc_ns != UNKNOWN else d.namespace,
            destination_canonical_service=d.canonical_service,
            destination_canonical_revision=d.canonical_revision,
            destination_cluster=d.cluster,
            request_protocol=protocol,
            connection_security_policy=policy,
        )


_esc = escape_label_value  # the one escaping function (exposition format 0.0.4)


class PeerKey:
    """An interned :class:`PeerLabels` with its label text rendered once. Pass it to ``record``."""

    __slots__ = ("fast", "index", "labels", "prefix", "slow", "suffix")

    def __init__(self, labels: PeerLabels, index: int) -> None:
        self.labels = labels
        self.index = index
        # series by response code when flags are "-" and there is no gRPC status (common case)
        self.fast: dict[int, list[float]] = {}
        # series by (response code, response flags, grpc status) otherwise
        self.slow: dict[tuple[int, str, str], list[float]] = {}
        head = [n for n in LABEL_NAMES if n not in PER_REQUEST_LABELS][:-1]
        self.prefix = ",".join(f'{n}="{_esc(getattr(labels, n))}"' for n in head)
        self.suffix = f'connection_security_policy="{_esc(labels.connection_security_policy)}"'

    def __repr__(self) -> str:
        return f"PeerKey({self.index}, {self.labels!r})"


# --------------------------------------------------------------------------- the recorder


def bucket_index(bounds: tuple[float, ...], x: float) -> int:
    """``bisect_left(bounds, x)``: how many bounds are below ``x``. A loop from the first bound:
    compiled, a native loop over unboxed floats, where ``bisect_left`` is a generic call that
    compares boxed numbers (three per request; issue 11, `sat`: ~2,000 -> ~300 instructions
    per request). Durations and sizes are mostly below the third or fourth bound."""
    i = 0
    for b in bounds:
        if b >= x:
            return i
        i += 1
    return i


class RecordFn(Protocol):
    def __call__(
        self,
        peer: PeerKey,
        response_code: int,
        response_flags: str,
        duration_ms: float,
        req_bytes: int,
        resp_bytes: int,
        grpc_status: str = "",
    ) -> None: ...


_HTTP_METRICS = tuple(st.api for st in ISTIO_HTTP_STATS.stats)

# layout of one HTTP series list: [count, dur_sum, req_sum, resp_sum, dur buckets.., req.., resp..]
_COUNT, _DUR_SUM, _REQ_SUM, _RESP_SUM, _HEAD = 0, 1, 2, 3, 4


class IstioMetrics:
    """Istio's standard HTTP and TCP metrics for one sidecar.

    Hot path: ``record(peer, code, flags, duration_ms, req_bytes, resp_bytes)``; TCP:
    ``tcp_open(peer)``, ``tcp_bytes(peer, sent, received)``, ``tcp_close(peer, flags)``.
    """

    def __init__(
        self,
        duration_buckets: Sequence[float] = DURATION_BUCKETS_MS,
        bytes_buckets: Sequence[float] = BYTES_BUCKETS,
    ) -> None:
        self._dur_bounds = tuple(float(b) for b in duration_buckets)
        self._byte_bounds = tuple(float(b) for b in bytes_buckets)
        if list(self._dur_bounds) != sorted(set(self._dur_bounds)) or list(
            self._byte_bounds
        ) != sorted(set(self._byte_bounds)):
            raise ValueError("histogram buckets must be strictly increasing, e.g. [1, 5, 50]")
        nd, nb = len(self._dur_bounds) + 1, len(self._byte_bounds) + 1
        self._req_off = _HEAD + nd
        self._resp_off = self._req_off + nb
        self._width = self._resp_off + nb
        self._peers: dict[PeerLabels, PeerKey] = {}
        self.record: RecordFn = self._make_record()
        """``record(peer, response_code, response_flags, duration_ms, req_bytes, resp_bytes,
        grpc_status="")``: count one finished HTTP request (dict lookup + list increments)."""
        # (peer, response_flags) -> a block of ISTIO_TCP_STATS, and its label text
        self._tcp: dict[tuple[PeerKey, str], dict[str, int]] = {}
        self._tcp_labels: dict[tuple[PeerKey, str], str] = {}
        # gRPC: (peer, code, flags, grpc status) -> a block of ISTIO_GRPC_STATS, and its labels
        self._messages: dict[tuple[PeerKey, int, str, str], dict[str, int]] = {}
        self._message_labels: dict[tuple[PeerKey, int, str, str], str] = {}
        # Telemetry API metric overrides (snapshot ``MetricOverride``s), applied at scrape time
        self.overrides: tuple[Any, ...] = ()

    # ----------------------------------------------------------------- setup (not hot)

    def peer(self, labels: PeerLabels) -> PeerKey:
        """Intern ``labels``: equal labels always give the same key (one series, not two)."""
        key = self._peers.get(labels)
        if key is None:
            key = self._peers[labels] = PeerKey(labels, len(self._peers))
        return key

    # ----------------------------------------------------------------- hot path

    def _make_record(self) -> RecordFn:
        """Build ``record`` as a closure: bounds and offsets are cell variables (fast loads)."""
        dur_bounds, byte_bounds = self._dur_bounds, self._byte_bounds
        req_off, resp_off, width = self._req_off, self._resp_off, self._width

        def record(
            peer: PeerKey,
            response_code: int,
            response_flags: str,
            duration_ms: float,
            req_bytes: int,
            resp_bytes: int,
            grpc_status: str = "",
        ) -> None:
            if response_flags == "-" and not grpc_status:
                s = peer.fast.get(response_code)
                if s is None:
                    s = peer.fast[response_code] = [0] * width
            else:
                key = (response_code, response_flags, grpc_status)
                s = peer.slow.get(key)
                if s is None:
                    s = peer.slow[key] = [0] * width
            s[0] += 1
            s[1] += duration_ms
            s[2] += req_bytes
            s[3] += resp_bytes
            s[4 + bucket_index(dur_bounds, duration_ms)] += 1
            s[req_off + (bucket_index(byte_bounds, req_bytes) if req_bytes else 0)] += 1
            s[resp_off + (bucket_index(byte_bounds, resp_bytes) if resp_bytes else 0)] += 1

        return record

    def _tcp_block(self, peer: PeerKey, response_flags: str) -> dict[str, int]:
        """The TCP series of (peer, flags): a ``stats.ISTIO_TCP_STATS`` block, its label text
        rendered (and escaped) once, here."""
        key = (peer, response_flags)
        b = self._tcp.get(key)
        if b is None:
            b = self._tcp[key] = ISTIO_TCP_STATS.block()
            self._tcp_labels[key] = (
                f'{peer.prefix},response_flags="{_esc(response_flags)}",{peer.suffix}'
            )
        return b

    def tcp_open(self, peer: PeerKey, response_flags: str = "-") -> None:
        b = self._tcp.get((peer, response_flags)) or self._tcp_block(peer, response_flags)
        b["connections_opened_total"] += 1

    def tcp_bytes(self, peer: PeerKey, sent: int, received: int, response_flags: str = "-") -> None:
        """Add bytes as they flow (Istio reports TCP bytes periodically, not only at close)."""
        b = self._tcp.get((peer, response_flags)) or self._tcp_block(peer, response_flags)
        b["sent_bytes_total"] += sent
        b["received_bytes_total"] += received

    def tcp_close(self, peer: PeerKey, response_flags: str = "-") -> None:
        b = self._tcp.get((peer, response_flags)) or self._tcp_block(peer, response_flags)
        b["connections_closed_total"] += 1

    def record_messages(
        self, peer: PeerKey, response_code: int, response_flags: str, grpc_status: str,
        request_messages: int, response_messages: int,
    ) -> None:  # fmt: skip
        """Count one gRPC request's messages (``istio_request/response_messages_total``)."""
        key = (peer, response_code, response_flags, grpc_status)
        b = self._messages.get(key)
        if b is None:
            b = self._messages[key] = ISTIO_GRPC_STATS.block()
            self._message_labels[key] = (
                f'{peer.prefix},response_code="{response_code}",'
                f'grpc_response_status="{_esc(grpc_status)}",'
                f'response_flags="{_esc(response_flags)}",{peer.suffix}'
            )
        b["request_messages_total"] += request_messages
        b["response_messages_total"] += response_messages

    # ----------------------------------------------------------------- scrape time

    def _series(self) -> Iterator[tuple[PeerKey, int, str, str, list[float]]]:
        for peer in self._peers.values():
            for code, s in peer.fast.items():
                yield peer, code, "-", "", s
            for (code, flags, grpc), s in peer.slow.items():
                yield peer, code, flags, grpc, s

    def request_count(self, **match: str) -> int:
        """Sum of ``istio_requests_total`` over series whose labels match (tests, CLI)."""
        total = 0
        for peer, code, flags, grpc, s in self._series():
            values = {"response_code": str(code), "response_flags": flags}
            values["grpc_response_status"] = grpc
            if all(values.get(k, getattr(peer.labels, k, None)) == v for k, v in match.items()):
                total += int(s[0])
        return total

    def collect(self, out: list[str]) -> None:
        """Append all Istio metric families in Prometheus text format."""
        if self.overrides:
            self._collect_overridden(out)
            return
        ordered = sorted(self._series(), key=lambda t: (t[0].index, t[1], t[2], t[3]))
        series = [
            (
                (
                    f'{p.prefix},response_code="{code}",grpc_response_status="{_esc(g)}",'
                    f'response_flags="{_esc(f)}",{p.suffix}'
                ),
                s,
            )
            for p, code, f, g, s in ordered
        ]
        dur_text = tuple(format_bound(b) for b in self._dur_bounds)
        byte_text = tuple(format_bound(b) for b in self._byte_bounds)
        if series:
            istio_header(out, "REQUEST_COUNT")
            for labels, s in series:
                out.append(f"{REQUESTS_TOTAL}{{{labels}}} {int(s[_COUNT])}\n")
            istio_header(out, "REQUEST_DURATION")
            for labels, s in series:
                histogram_lines(
                    out, REQUEST_DURATION, labels, dur_text, s, _HEAD, s[_DUR_SUM], int(s[_COUNT])
                )
            istio_header(out, "REQUEST_SIZE")
            for labels, s in series:
                histogram_lines(
                    out, REQUEST_BYTES, labels, byte_text, s, self._req_off, s[_REQ_SUM],
                    int(s[_COUNT]),
                )  # fmt: skip
            istio_header(out, "RESPONSE_SIZE")
            for labels, s in series:
                histogram_lines(
                    out, RESPONSE_BYTES, labels, byte_text, s, self._resp_off, s[_RESP_SUM],
                    int(s[_COUNT]),
                )  # fmt: skip
        if self._messages:
            mkeys = sorted(self._messages, key=lambda k: (k[0].index, k[1], k[2], k[3]))
            rows = [(self._message_labels[k], self._messages[k]) for k in mkeys]
            collect(out, ISTIO_GRPC_STATS, rows)
        if self._tcp:
            keys = sorted(self._tcp, key=lambda k: (k[0].index, k[1]))
            collect(out, ISTIO_TCP_STATS, [(self._tcp_labels[k], self._tcp[k]) for k in keys])

    def _collect_overridden(self, out: list[str]) -> None:
        """``collect`` with the Telemetry API's metric overrides: a family disabled for a
        reporter loses those series; removed tags go (series that become equal are summed),
        upserted tags get their value."""
        ordered = sorted(self._series(), key=lambda t: (t[0].index, t[1], t[2], t[3]))
        dur_text = tuple(format_bound(b) for b in self._dur_bounds)
        byte_text = tuple(format_bound(b) for b in self._byte_bounds)
        for metric in _HTTP_METRICS:
            name = ISTIO_NAMES[metric]
            merged: dict[str, list[float]] = {}
            for p, code, f, g, s in ordered:
                values = _label_values(p.labels, str(code), g, f)
                labels = _apply_overrides(self.overrides, metric, values)
                if labels is None:
                    continue
                acc = merged.get(labels)
                merged[labels] = (
                    list(s) if acc is None else [a + b for a, b in zip(acc, s, strict=True)]
                )
            if not merged:
                continue
            istio_header(out, metric)
            for labels, s in merged.items():
                if metric == "REQUEST_COUNT":
                    out.append(f"{name}{{{labels}}} {int(s[_COUNT])}\n")
                elif metric == "REQUEST_DURATION":
                    histogram_lines(
                        out, name, labels, dur_text, s, _HEAD, s[_DUR_SUM], int(s[_COUNT])
                    )
                elif metric == "REQUEST_SIZE":
                    histogram_lines(
                        out, name, labels, byte_text, s, self._req_off, s[_REQ_SUM], int(s[_COUNT])
                    )
                else:
                    histogram_lines(
                        out, name, labels, byte_text, s, self._resp_off, s[_RESP_SUM],
                        int(s[_COUNT]),
                    )  # fmt: skip
        msg_items = sorted(
            self._messages.items(), key=lambda kv: (kv[0][0].index, kv[0][1], kv[0][2], kv[0][3])
        )
        for st in ISTIO_GRPC_STATS.stats:
            metric, name = st.api, ISTIO_GRPC_STATS.name(st.key)
            sums: dict[str, int] = {}
            for (p, code, f, g), b in msg_items:
                values = _label_values(p.labels, str(code), g, f)
                labels = _apply_overrides(self.overrides, metric, values)
                if labels is not None:
                    sums[labels] = sums.get(labels, 0) + b[st.key]
            if sums:
                istio_header(out, metric)
                for labels, v in sums.items():
                    out.append(f"{name}{{{labels}}} {format_value(v)}\n")
        tcp_items = sorted(self._tcp.items(), key=lambda kv: (kv[0][0].index, kv[0][1]))
        for st in ISTIO_TCP_STATS.stats:
            metric, name = st.api, ISTIO_TCP_STATS.name(st.key)
            totals: dict[str, int] = {}
            for (p, f), b in tcp_items:
                values = _label_values(p.labels, None, None, f)
                labels = _apply_overrides(self.overrides, metric, values)
                if labels is not None:
                    totals[labels] = totals.get(labels, 0) + b[st.key]
            if totals:
                istio_header(out, metric)
                for labels, v in totals.items():
                    out.append(f"{name}{{{labels}}} {format_value(v)}\n")


def _label_values(
    labels: PeerLabels, code: str | None, grpc: str | None, flags: str
) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in LABEL_NAMES:
        if n == "response_code":
            if code is not None:
                out[n] = code
        elif n == "grpc_response_status":
            if grpc is not None:
                out[n] = grpc
        elif n == "response_flags":
            out[n] = flags
        else:
            out[n] = getattr(labels, n)
    return out


_MODE_REPORTER = {"CLIENT": "source", "SERVER": "destination"}


def _apply_overrides(overrides: Sequence[Any], metric: str, values: dict[str, str]) -> str | None:
    """Label text after the overrides that match ``metric`` and the series' reporter, or None
    when the metric is disabled for it (later overrides win)."""
    reporter = values.get("reporter", "")
    disabled = False
    for ov in overrides:
        if ov.metric not in ("ALL_METRICS", metric):
            continue
        want = _MODE_REPORTER.get(ov.mode)
        if want is not None and want != reporter:
            continue
        if ov.disabled is not None:
            disabled = ov.disabled
        for tag in ov.remove:
            values.pop(tag, None)
        for tag, v in ov.upsert.items():
            values[tag] = v
    if disabled:
        return None
    return ",".join(f'{k}="{_esc(v)}"' for k, v in values.items())

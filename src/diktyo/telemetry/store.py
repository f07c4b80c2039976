"""The control plane's embedded telemetry store: an edge time-series ring and a SQLite trace store.

Theory of operation
-------------------
:class:`MetricStore` is fed Prometheus text scraped from sidecars (``ingest(instance, text,
t)``). For each (instance, series) it keeps the last cumulative value and turns the next one
into a delta (a smaller value means the sidecar restarted: the new value is the delta). Deltas
are summed per *edge* — (reporter, source workload/namespace/version, destination
service/workload/version) — into fixed time slots (default 5 s, 720 slots = 1 h) of a ring.
Queries sum the slots of a window: request rate, error rate (5xx and 0 = no response) and
p50/p95/p99 from the summed histogram buckets with Prometheus' ``histogram_quantile`` rule.

:class:`TraceStore` keeps spans in SQLite with a bound on the number of spans (the oldest
traces go first); ``ingest_otlp(body)`` is the OTLP/HTTP receiver's whole job.

Both are synchronous and small; the aiohttp routes live in :mod:`diktyo.telemetry.http`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.telemetry.otlp import DecodedSpan, OtlpDecodeError, decode_spans
from diktyo.telemetry.promtext import SeriesCache, parse

# --------------------------------------------------------------------------- quantiles


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` on cumulative bucket counts keyed by ``le``."""
    if not buckets:
        return None
    les = sorted(buckets)
    if not math.isinf(les[-1]):
        return None
    total = buckets[les[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le if len(les) > 1 else None
            if le <= 0 or count == prev_count:
                return le
            lower = prev_le if prev_le < le else 0.0
            return lower + (le - lower) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


# --------------------------------------------------------------------------- metric store

EDGE_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_version",
    "destination_service",
    "destination_workload",
    "destination_version",
)
EdgeKey = tuple[str, str, str, str, str, str, str]
_WANTED_PREFIXES = (
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_tcp_",
    "envoy_cluster_",
)


@dataclass(slots=True)
class EdgeSlot:
    """Deltas for one edge in one time slot."""

    requests: float = 0.0
    errors: float = 0.0
    codes: dict[str, float] = field(default_factory=dict)  # "2xx" ... "5xx", "0"
    duration_buckets: dict[float, float] = field(default_factory=dict)  # cumulative by le
    duration_sum: float = 0.0
    tcp_sent: float = 0.0
    tcp_received: float = 0.0
    tcp_opened: float = 0.0

    def add(self, other: EdgeSlot) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for k, v in other.codes.items():
            self.codes[k] = self.codes.get(k, 0.0) + v
        for le, v in other.duration_buckets.items():
            self.duration_buckets[le] = self.duration_buckets.get(le, 0.0) + v
        self.duration_sum += other.duration_sum
        self.tcp_sent += other.tcp_sent
        self.tcp_received += other.tcp_received
        self.tcp_opened += other.tcp_opened


class MetricStore:
    """Bounded time-series ring of per-edge request deltas (default 1 h at 5 s)."""

    def __init__(
        self, resolution: float = 5.0, retention: float = 3600.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if resolution <= 0 or retention < resolution:
            raise ValueError("resolution must be > 0 and retention >= resolution (seconds)")
        self.resolution = resolution
        self.slots = int(retention // resolution)
        self.clock = clock
        self._ring: dict[int, dict[EdgeKey, EdgeSlot]] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._series_cache: dict[str, SeriesCache] = {}
        self._last_seen: dict[str, float] = {}
        # latest envoy_cluster_* values: instance -> cluster_name -> stat -> value
        self._clusters: dict[str, dict[str, dict[str, float]]] = {}
        self.bad_lines = 0
        self.scrapes = 0
        # ("<src ns>/<src workload>", dst workload) -> [last time seen over mTLS, in plaintext]
        # (destination reporter's connection_security_policy), for the graph's mTLS flag
        self._security: dict[tuple[str, str], list[float]] = {}

    def mtls_edge(self, source_id: str, target_id: str) -> bool:
        """Whether the latest calls from ``ns/workload`` to ``target_id`` (``ns/workload``)
        used mutual TLS, as the destination sidecar reported (``MeshBackend(mtls=...)``)."""
        seen = self._security.get((source_id, target_id.rsplit("/", 1)[-1]))
        return seen is not None and seen[0] >= seen[1] and seen[0] > 0.0

    # ------------------------------------------------------------------ ingest

    def _delta(self, instance: str, series: str, value: float, known: bool) -> float:
        key = (instance, series)
        prev = self._last.get(key)
        self._last[key] = value
        if prev is None:
            # a series new on a known sidecar started at 0 since the last scrape; on the first
            # scrape of a sidecar its history is unknown, so it gives no rate yet
            return value if known else 0.0
        return value - prev if value >= prev else value  # reset -> restarted sidecar

    def ingest(self, instance: str, text: str, t: float | None = None) -> int:
        """Fold one scrape of ``instance`` taken at wall time ``t``; returns samples used."""
        t = self.clock.time() if t is None else t
        res = parse(text, _WANTED_PREFIXES, self._series_cache.setdefault(instance, {}))
        self.bad_lines += res.bad_lines
        self.scrapes += 1
        first_scrape = instance not in self._last_seen
        self._last_seen[instance] = t
        slot_idx = int(t // self.resolution)
        slot = self._ring.setdefault(slot_idx, {})
        used = 0
        clusters: dict[str, dict[str, float]] = {}
        for s in res.samples:
            name = s.name
            if name.startswith("envoy_cluster_"):
                cname = s.labels.get("cluster_name")
                if cname is not None:
                    clusters.setdefault(cname, {})[name[len("envoy_cluster_") :]] = s.value
                continue
            if not name.startswith("istio_"):
                continue
            if name not in (
                "istio_requests_total",
                "istio_request_duration_milliseconds_bucket",
                "istio_request_duration_milliseconds_sum",
                "istio_tcp_sent_bytes_total",
                "istio_tcp_received_bytes_total",
                "istio_tcp_connections_opened_total",
            ):
                continue
            d = self._delta(instance, s.series, s.value, not first_scrape)
            used += 1
            if d == 0.0:
                continue
            lb = s.labels
            edge: EdgeKey = tuple(lb.get(n, "unknown") for n in EDGE_LABELS)  # type: ignore[assignment]
            e = slot.get(edge)
            if e is None:
                e = slot[edge] = EdgeSlot()
            if name == "istio_requests_total":
                policy = lb.get("connection_security_policy")
                if policy == "mutual_tls" or policy == "none":
                    src_ns = lb.get("source_workload_namespace", "unknown")
                    src_wl = lb.get("source_workload", "unknown")
                    pair = (f"{src_ns}/{src_wl}", lb.get("destination_workload", "unknown"))
                    seen = self._security.get(pair)
                    if seen is None:
                        seen = self._security[pair] = [0.0, 0.0]
                    seen[0 if policy == "mutual_tls" else 1] = t
                code = lb.get("response_code", "")
                e.requests += d
                cls = code_class(code)
                e.codes[cls] = e.codes.get(cls, 0.0) + d
                if is_error(code):
                    e.errors += d
            elif name == "istio_request_duration_milliseconds_bucket":
                try:
                    le = float(lb.get("le", "nan").replace("+Inf", "inf"))
                except ValueError:
                    continue
                e.duration_buckets[le] = e.duration_buckets.get(le, 0.0) + d
            elif name == "istio_request_duration_milliseconds_sum":
                e.duration_sum += d
            elif name == "istio_tcp_sent_bytes_total":
                e.tcp_sent += d
            elif name == "istio_tcp_received_bytes_total":
                e.tcp_received += d
            else:
                e.tcp_opened += d
        self._clusters[instance] = clusters
        self._evict(slot_idx)
        return used

    def forget(self, instance: str) -> None:
        """Drop the cumulative state of a sidecar that went away."""
        self._last_seen.pop(instance, None)
        self._clusters.pop(instance, None)
        self._series_cache.pop(instance, None)
        for k in [k for k in self._last if k[0] == instance]:
            del self._last[k]

    def _evict(self, newest: int) -> None:
        oldest = newest - self.slots
        for k in [k for k in self._ring if k <= oldest]:
            del self._ring[k]

    # ------------------------------------------------------------------ queries

    def cluster_stats(self) -> dict[str, dict[str, dict[str, float]]]:
        """Latest Envoy cluster stats per sidecar: instance -> cluster -> stat -> value.

        Stat names without the ``envoy_cluster_`` prefix, e.g. ``upstream_rq_pending_overflow``,
        ``upstream_cx_active``, ``outlier_detection_ejections_active`` (breaker/outlier views).
        """
        return {i: {c: dict(v) for c, v in cs.items()} for i, cs in sorted(self._clusters.items())}

    def _window(self, window: float, now: float | None) -> tuple[int, int]:
        now = self.clock.time() if now is None else now
        end = int(now // self.resolution)
        n = max(1, math.ceil(window / self.resolution))
        return end - n + 1, end

    def edges(
        self, window: float = 60.0, now: float | None = None, reporter: str | None = None
    ) -> dict[EdgeKey, EdgeSlot]:
        """Summed deltas per edge over the last ``window`` seconds."""
        lo, hi = self._window(window, now)
        out: dict[EdgeKey, EdgeSlot] = {}
        for idx, slot in self._ring.items():
            if lo <= idx <= hi:
                for edge, e in slot.items():
                    if reporter is not None and edge[0] != reporter:
                        continue
                    acc = out.get(edge)
                    if acc is None:
                        acc = out[edge] = EdgeSlot()
                    acc.add(e)
        return out

    def graph(self, window: float = 60.0, now: float | None = None) -> dict[str, Any]:
        """The service graph: nodes and edges with rate, error rate and latency percentiles.

        Each request is usually reported twice (by the client's and the server's sidecar);
        an edge uses ``reporter="source"`` data when there is any, else ``destination``.
        """
        span = max(1, math.ceil(window / self.resolution)) * self.resolution
        return service_graph(
            span, {k: summarize(e, span) for k, e in self.edges(window, now).items()}
        )

    def series(
        self,
        match: Mapping[str, str] | None = None,
        window: float = 600.0,
        now: float | None = None,
        reporter: str = "destination",
    ) -> list[dict[str, Any]]:
        """Per-slot points for the edges matching ``match`` (labels of :data:`EDGE_LABELS`)."""
        lo, hi = self._window(window, now)
        match = dict(match or {})
        idx_of = {n: i for i, n in enumerate(EDGE_LABELS)}
        for k in match:
            if k not in idx_of:
                raise ValueError(f"unknown filter {k!r}; use one of {', '.join(EDGE_LABELS)}")
        points = []
        for idx in range(lo, hi + 1):
            acc = EdgeSlot()
            for edge, e in self._ring.get(idx, {}).items():
                if edge[0] != reporter:
                    continue
                if all(edge[idx_of[k]] == v for k, v in match.items()):
                    acc.add(e)
            points.append({"t": idx * self.resolution, **summarize(acc, self.resolution)})
        return points


def summarize(e: EdgeSlot, seconds: float) -> dict[str, Any]:
    """Golden signals of summed deltas over ``seconds`` (quantiles from the summed buckets)."""
    b = e.duration_buckets
    return golden_signals(
        seconds, e.requests, e.errors, e.codes,
        (histogram_quantile(0.50, b), histogram_quantile(0.95, b), histogram_quantile(0.99, b)),
        e.duration_sum,
        e.tcp_sent / seconds if seconds > 0 else 0.0,
        e.tcp_received / seconds if seconds > 0 else 0.0,
    )  # fmt: skip


def golden_signals(
    seconds: float,
    requests: float,
    errors: float,
    codes: Mapping[str, float],
    quantiles: tuple[float | None, float | None, float | None],
    duration_sum: float,
    tcp_sent_bps: float,
    tcp_received_bps: float,
) -> dict[str, Any]:
    """The one shape of an edge's or a point's numbers, whatever the source (the embedded
    store or Prometheus): rps, errorRate, codes by class, p50/p95/p99, meanMs, TCP rates."""
    rq = requests
    p50, p95, p99 = quantiles if rq else (None, None, None)
    return {
        "requests": rq,
        "rps": rq / seconds if seconds > 0 else 0.0,
        "errorRate": (errors / rq) if rq else 0.0,
        "codes": dict(sorted(codes.items())),
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "meanMs": (duration_sum / rq) if rq else None,
        "tcpSentBps": tcp_sent_bps,
        "tcpReceivedBps": tcp_received_bps,
    }


def service_graph(
    span: float, edges: Mapping[tuple[str, ...], Mapping[str, Any]]
) -> dict[str, Any]:
    """The service graph from per-edge golden signals keyed by :data:`EDGE_LABELS` values.

    Each request is usually reported twice (by the client's and the server's sidecar): one
    edge per (source, destination), from ``reporter="source"`` data when there is any, else
    ``destination``. Nodes are source workloads (``namespace/name``) and destination services.
    The one fold for both metric sources (``MetricStore`` and ``PrometheusSource``).
    """
    merged: dict[tuple[str, ...], tuple[str, Mapping[str, Any]]] = {}
    for key, sig in sorted(edges.items(), key=lambda kv: kv[0][0] != "source"):
        merged.setdefault(key[1:], (key[0], sig))
    nodes: dict[str, dict[str, Any]] = {}
    edges_out = []
    for (src_wl, src_ns, src_ver, dst_svc, dst_wl, dst_ver), (reporter, sig) in sorted(
        merged.items()
    ):
        src_id = f"{src_ns}/{src_wl}" if src_wl != "unknown" else "unknown"
        nodes.setdefault(src_id, {"id": src_id, "kind": "workload", "name": src_wl,
                                  "namespace": src_ns})  # fmt: skip
        nodes.setdefault(dst_svc, {"id": dst_svc, "kind": "service", "name": dst_svc})
        edges_out.append(
            {
                "source": src_id,
                "target": dst_svc,
                "sourceWorkload": src_wl,
                "sourceVersion": src_ver,
                "destinationService": dst_svc,
                "destinationWorkload": dst_wl,
                "destinationVersion": dst_ver,
                "reporter": reporter,
                **sig,
            }
        )
    return {"window": span, "nodes": list(nodes.values()), "edges": edges_out}


def code_class(code: str) -> str:
    """``"503"`` -> ``"5xx"``; ``"0"`` (no response) and other values stay as they are."""
    return f"{code[0]}xx" if len(code) == 3 and code.isdigit() else code or "0"


def is_error(code: str) -> bool:
    """5xx, or no response at all (``0`` / empty): what error rates count."""
    return code in ("0", "") or code.startswith("5")


# --------------------------------------------------------------------------- trace store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_id TEXT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    service TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_message TEXT NOT NULL,
    attributes TEXT NOT NULL,
    UNIQUE (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_trace ON spans (trace_id);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    span_count INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    services TEXT NOT NULL,
    root_name TEXT,
    root_service TEXT
);
CREATE INDEX IF NOT EXISTS traces_start ON traces (start_ns);
"""


class TraceStore:
    """Spans in SQLite (``:memory:`` by default), at most ``max_spans`` of them."""

    def __init__(self, path: str = ":memory:", max_spans: int = 50_000) -> None:
        self.max_spans = max_spans
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.executescript(_SCHEMA)
        self.rejected_bodies = 0
        self.evicted_traces = 0

    def close(self) -> None:
        self.db.close()

    def ingest_otlp(self, body: bytes) -> int:
        """Store the spans of an OTLP ``ExportTraceServiceRequest``; returns how many.

        Raises :class:`OtlpDecodeError` for a body that is not one (answer HTTP 400).
        """
        try:
            spans = decode_spans(body)
        except OtlpDecodeError:
            self.rejected_bodies += 1
            raise
        return self.add(spans)

    def add(self, spans: Iterable[DecodedSpan]) -> int:
        n = 0
        cur = self.db.cursor()
        cur.execute("BEGIN")
        try:
            for s in spans:
                cur.execute(
                    "INSERT OR IGNORE INTO spans (trace_id, span_id, parent_id, name, kind, "
                    "service, start_ns, end_ns, status, status_message, attributes) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (s.trace_id, s.span_id, s.parent_id, s.name, s.kind, s.service, s.start_ns,
                     s.end_ns, s.status, s.status_message, json.dumps(s.attributes)),
                )  # fmt: skip
                if cur.rowcount != 1:
                    continue
                n += 1
                seq = cur.lastrowid
                err = 1 if s.status == "error" else 0
                row = cur.execute(
                    "SELECT services FROM traces WHERE trace_id = ?", (s.trace_id,)
                ).fetchone()
                if row is None:
                    cur.execute(
                        "INSERT INTO traces VALUES (?,?,?,?,?,?,?,?,?)",
                        (s.trace_id, seq, s.start_ns, s.end_ns, 1, err, f",{s.service},",
                         s.name if s.parent_id is None else None,
                         s.service if s.parent_id is None else None),
                    )  # fmt: skip
                else:
                    services = row[0]
                    if f",{s.service}," not in services:
                        services += f"{s.service},"
                    cur.execute(
                        "UPDATE traces SET start_ns = MIN(start_ns, ?), end_ns = MAX(end_ns, ?), "
                        "span_count = span_count + 1, errors = errors + ?, services = ?, "
                        "root_name = COALESCE(?, root_name), "
                        "root_service = COALESCE(?, root_service) WHERE trace_id = ?",
                        (s.start_ns, s.end_ns, err, services,
                         s.name if s.parent_id is None else None,
                         s.service if s.parent_id is None else None, s.trace_id),
                    )  # fmt: skip
            self._evict(cur)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return n

    def _evict(self, cur: sqlite3.Cursor) -> None:
        (count,) = cur.execute("SELECT COUNT(*) FROM spans").fetchone()
        while count > self.max_spans:
            excess = count - self.max_spans
            victims = cur.execute(
                "SELECT trace_id, span_count FROM traces ORDER BY first_seq LIMIT ?",
                (max(1, min(excess, 1000)),),
            ).fetchall()
            removed = 0
            for tid, sc in victims:
                cur.execute("DELETE FROM spans WHERE trace_id = ?", (tid,))
                cur.execute("DELETE FROM traces WHERE trace_id = ?", (tid,))
                removed += sc
                self.evicted_traces += 1
                if removed >= excess:
                    break
            count -= removed

    def span_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM spans").fetchone()[0])

    def list_traces(
        self,
        service: str | None = None,
        min_duration_ms: float | None = None,
        errors_only: bool = False,
        limit: int = 50,
        since_ns: int | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first: trace id, root, services, start, duration, span and error counts."""
        where: list[str] = []
        args: list[object] = []
        if service:
            where.append("instr(services, ?) > 0")
            args.append(f",{service},")
        if min_duration_ms is not None:
            where.append("(end_ns - start_ns) >= ?")
            args.append(int(min_duration_ms * 1e6))
        if errors_only:
            where.append("errors > 0")
        if since_ns is not None:
            where.append("start_ns >= ?")
            args.append(since_ns)
        sql = (
            "SELECT trace_id, start_ns, end_ns, span_count, errors, services, root_name, "
            "root_service FROM traces"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY start_ns DESC LIMIT ?"
        )
        args.append(max(1, min(int(limit), 1000)))
        return [
            {
                "traceId": tid,
                "startNs": start,
                "durationMs": (end - start) / 1e6,
                "spanCount": sc,
                "errors": errs,
                "services": [x for x in services.split(",") if x],
                "rootName": root_name,
                "rootService": root_service,
            }
            for tid, start, end, sc, errs, services, root_name, root_service in self.db.execute(
                sql, args
            )
        ]

    def get_trace(self, trace_id: str) -> list[dict[str, Any]]:
        """All spans of one trace, by start time ([] if unknown)."""
        rows = self.db.execute(
            "SELECT trace_id, span_id, parent_id, name, kind, service, start_ns, end_ns, status, "
            "status_message, attributes FROM spans WHERE trace_id = ? ORDER BY start_ns, seq",
            (trace_id.lower(),),
        ).fetchall()
        return [
            DecodedSpan(
                trace_id=r[0], span_id=r[1], parent_id=r[2], name=r[3], kind=r[4], service=r[5],
                start_ns=r[6], end_ns=r[7], status=r[8], status_message=r[9],
                attributes=json.loads(r[10]),
            ).to_json()
            for r in rows
        ]  # fmt: skip


def services_of(traces: Sequence[dict[str, Any]]) -> set[str]:
    return {s for t in traces for s in t["services"]}

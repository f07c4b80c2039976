"""aiohttp routes of the embedded telemetry store, for the control plane's server.

Mount with ``setup_routes(app, metrics, traces)``:

- ``GET  /api/metrics/graph?window=60`` — service graph with per-edge rate, error rate, p50/95/99
- ``GET  /api/metrics/series?window=600&reporter=destination&destination_service=...`` — points
- ``GET  /api/metrics/edges?window=60&reporter=destination`` — raw per-edge sums (no merging),
  with histogram buckets, for clients that aggregate themselves (``diktyo stat``)
- ``GET  /api/metrics/clusters`` — latest Envoy cluster stats (breakers, outliers) per sidecar
- ``GET  /api/traces?service=&minDurationMs=&errors=1&limit=50`` — newest traces first
- ``GET  /api/traces/{trace_id}`` — all spans of one trace
- ``POST /v1/traces`` — OTLP/HTTP receiver (``application/x-protobuf``)
"""

from __future__ import annotations

import math

from aiohttp import web

from diktyo.telemetry.otlp import CONTENT_TYPE as OTLP_CONTENT_TYPE
from diktyo.telemetry.otlp import OtlpDecodeError
from diktyo.telemetry.store import EDGE_LABELS, MetricStore, TraceStore

METRICS_KEY = web.AppKey("diktyo_telemetry_metrics", MetricStore)
TRACES_KEY = web.AppKey("diktyo_telemetry_traces", TraceStore)
MAX_OTLP_BODY = 8 * 1024 * 1024


def _bad(msg: str) -> web.Response:
    return web.json_response({"error": msg}, status=400)


def _float(req: web.Request, name: str, default: float | None) -> float | None:
    raw = req.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"error": "query parameter {name} must be a number, got {raw[:40]!r}"}}',
            content_type="application/json",
        ) from None
    if v < 0 or not math.isfinite(v):
        raise web.HTTPBadRequest(
            text=f'{{"error": "query parameter {name} must be >= 0"}}',
            content_type="application/json",
        )
    return v


def make_routes() -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/api/metrics/graph")
    async def graph(req: web.Request) -> web.Response:
        window = _float(req, "window", 60.0) or 60.0
        return web.json_response(req.app[METRICS_KEY].graph(min(window, 86400.0)))

    @routes.get("/api/metrics/series")
    async def series(req: web.Request) -> web.Response:
        window = _float(req, "window", 600.0) or 600.0
        reporter = req.query.get("reporter", "destination")
        if reporter not in ("source", "destination"):
            return _bad("reporter must be 'source' or 'destination'")
        match = {k: v for k, v in req.query.items() if k in EDGE_LABELS and k != "reporter"}
        unknown = set(req.query) - set(EDGE_LABELS) - {"window"}
        if unknown:
            return _bad(
                f"unknown query parameter(s) {sorted(unknown)}; filters: {', '.join(EDGE_LABELS)}"
            )
        store = req.app[METRICS_KEY]
        points = store.series(match, min(window, 86400.0), reporter=reporter)
        return web.json_response({"step": store.resolution, "match": match, "points": points})

    @routes.get("/api/metrics/edges")
    async def edges(req: web.Request) -> web.Response:
        window = _float(req, "window", 60.0) or 60.0
        reporter = req.query.get("reporter") or None
        if reporter not in (None, "source", "destination"):
            return _bad("reporter must be 'source' or 'destination'")
        store = req.app[METRICS_KEY]
        window = min(window, 86400.0)
        span = max(1, math.ceil(window / store.resolution)) * store.resolution
        out = [
            {
                **dict(zip(EDGE_LABELS, key, strict=True)),
                "requests": e.requests,
                "errors": e.errors,
                "codes": dict(sorted(e.codes.items())),
                # [le, cumulative count]; le "+Inf" as a string (JSON has no infinity)
                "durationBuckets": [
                    ["+Inf" if math.isinf(le) else le, c]
                    for le, c in sorted(e.duration_buckets.items())
                ],
                "durationSum": e.duration_sum,
                "tcpSent": e.tcp_sent,
                "tcpReceived": e.tcp_received,
                "tcpOpened": e.tcp_opened,
            }
            for key, e in sorted(store.edges(window, reporter=reporter).items())
        ]
        return web.json_response({"window": span, "edges": out})

    @routes.get("/api/metrics/clusters")
    async def clusters(req: web.Request) -> web.Response:
        return web.json_response({"instances": req.app[METRICS_KEY].cluster_stats()})

    @routes.get("/api/traces")
    async def traces(req: web.Request) -> web.Response:
        min_dur = _float(req, "minDurationMs", None)
        limit = int(_float(req, "limit", 50) or 50)
        errors = req.query.get("errors", "") in ("1", "true", "yes")
        rows = req.app[TRACES_KEY].list_traces(
            service=req.query.get("service") or None,
            min_duration_ms=min_dur,
            errors_only=errors,
            limit=limit,
        )
        return web.json_response({"traces": rows})

    @routes.get("/api/traces/{trace_id}")
    async def trace(req: web.Request) -> web.Response:
        tid = req.match_info["trace_id"].lower()
        spans = req.app[TRACES_KEY].get_trace(tid)
        if not spans:
            return web.json_response({"error": f"no trace {tid[:64]} (expired or never seen)"},
                                     status=404)  # fmt: skip
        return web.json_response({"traceId": tid, "spans": spans})

    @routes.post("/v1/traces")
    async def otlp(req: web.Request) -> web.Response:
        ctype = req.content_type
        if ctype != OTLP_CONTENT_TYPE:
            return web.json_response(
                {"error": f"send OTLP as {OTLP_CONTENT_TYPE} (protobuf); got {ctype!r}"},
                status=415,
            )
        if req.content_length is not None and req.content_length > MAX_OTLP_BODY:
            return web.json_response({"error": "OTLP body too large"}, status=413)
        body = await req.read()
        try:
            req.app[TRACES_KEY].ingest_otlp(body)
        except OtlpDecodeError as e:
            return _bad(str(e))
        # an empty ExportTraceServiceResponse is zero bytes of protobuf
        return web.Response(body=b"", content_type=OTLP_CONTENT_TYPE)

    return routes


def setup_routes(app: web.Application, metrics: MetricStore, traces: TraceStore) -> None:
    """Register the telemetry API and the OTLP receiver on ``app`` (before it starts)."""
    app[METRICS_KEY] = metrics
    app[TRACES_KEY] = traces
    app.add_routes(make_routes())

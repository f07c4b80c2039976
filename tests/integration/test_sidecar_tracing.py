"""Tracing through the sidecar: trace headers propagated upstream, spans exported over OTLP/HTTP."""

from __future__ import annotations

import asyncio

from diktyo.telemetry.otlp import decode_spans
from diktyo.testing import FakeUpstream, Response, http_request, http_snapshot, start_sidecar


async def test_spans_exported_and_context_propagated() -> None:
    async with (
        FakeUpstream() as app,
        FakeUpstream(Response(body=b"")) as collector,
    ):
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh={
                "tracing": {
                    "sampling": 100.0,
                    "otlp_endpoint": f"http://127.0.0.1:{collector.port}/v1/traces",
                }
            },
        )
        async with start_sidecar(snap) as sc:
            parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
            r = await http_request(
                sc.port(),
                "GET",
                "http://reviews/traced",
                {"traceparent": f"00-{parent_trace}-00f067aa0ba902b7-01", "x-request-id": "rid-7"},
            )
            assert r.status == 200
            r = await http_request(sc.port(), "GET", "http://reviews/new-trace")
            assert r.status == 200
            q1, q2 = app.requests
            assert q1.headers["traceparent"].startswith(f"00-{parent_trace}-")
            assert q1.headers["x-b3-traceid"] == parent_trace
            assert q1.headers["x-request-id"] == "rid-7"
            assert q2.headers["traceparent"].endswith("-01")  # sampled at 100 %
            assert q2.headers["x-b3-traceid"] != parent_trace
            for _ in range(60):
                if collector.requests:
                    break
                await asyncio.sleep(0.05)
            spans = [s for q in collector.requests for s in decode_spans(q.body)]
            assert {s.trace_id for s in spans} >= {parent_trace}
            span = next(s for s in spans if s.trace_id == parent_trace)
            assert span.name == "reviews:80/*"
            assert span.kind == "client"


async def test_no_collector_no_trace_headers() -> None:
    async with (
        FakeUpstream() as app,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", app.port)]})) as sc,
    ):
        await http_request(sc.port(), "GET", "http://reviews/")
        assert "traceparent" not in app.requests[0].headers
        assert sc.sidecar.rt.tracer is None

"""Tracing through the sidecar: trace headers propagated upstream, spans exported over OTLP/HTTP."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from diktyo.telemetry.otlp import decode_spans
from diktyo.testing import (
    FakeUpstream,
    Response,
    eventually,
    http_request,
    http_snapshot,
    start_sidecar,
)


def _traced(collector: FakeUpstream) -> dict[str, Any]:
    """The mesh config of these tests: every request sampled, spans sent to ``collector``."""
    return {
        "tracing": {
            "sampling": 100.0,
            "otlp_endpoint": f"http://127.0.0.1:{collector.port}/v1/traces",
        }
    }


async def test_spans_exported_and_context_propagated() -> None:
    async with (
        FakeUpstream() as app,
        FakeUpstream(Response(body=b"")) as collector,
    ):
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh=_traced(collector),
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
            await eventually(lambda: collector.requests, timeout=10, what="spans exported")
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


async def _spans(collector: FakeUpstream, n: int) -> list[Any]:
    """The spans the collector received, once ``n`` have arrived (10 s deadline)."""

    def spans() -> list[Any]:
        return [s for q in collector.requests for s in decode_spans(q.body)]

    return await eventually(
        lambda: len(spans()) >= n and spans(),
        timeout=10,
        what=lambda: f"{n} spans at the collector (have {len(spans())})",
    )


async def test_spans_carry_envoy_and_istio_tags() -> None:
    """Client and server spans carry the tags an Istio sidecar's Envoy puts on its spans."""
    async with (
        FakeUpstream(Response(body=b"twelve bytes")) as app,
        FakeUpstream(Response(body=b"")) as collector,
    ):
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh=_traced(collector),
            extra_clusters=[
                {
                    "name": "inbound|9080||",
                    "direction": "inbound",
                    "endpoints": [{"address": "127.0.0.1", "port": app.port}],
                }
            ],
            listeners=[
                {
                    "name": "inbound",
                    "direction": "inbound",
                    "port": 0,
                    "cluster": "inbound|9080||",
                    "service_port": 9080,
                }
            ],
        )
        async with start_sidecar(snap) as sc:
            r = await http_request(
                sc.port(),
                "POST",
                "http://reviews/reviews/0?x=" + "a" * 300,
                {"user-agent": "curl/8.1", "x-request-id": "rid-42"},
                body=b"hello",
            )
            assert r.status == 200
            r = await http_request(
                sc.port("inbound"),
                "GET",
                "/in",
                {"Host": "reviews:9080", "x-envoy-downstream-service-cluster": "productpage"},
            )
            assert r.status == 200
            spans = await _spans(collector, 2)
    client = next(s for s in spans if s.kind == "client")
    server = next(s for s in spans if s.kind == "server")
    a = client.attributes
    static = {
        "istio.canonical_service": "test",  # the node's app label
        "istio.canonical_revision": "latest",  # no version label
        "istio.mesh_id": "cluster.local",  # Istio's default: the trust domain
        "istio.namespace": "default",
        "istio.cluster_id": "unknown",
        "node_id": "test.default",
        "zone": "",
        "component": "proxy",
    }
    assert {k: a.get(k) for k in static} == static
    assert client.name == "reviews:80/*"
    assert a["guid:x-request-id"] == "rid-42"
    # scheme://authority + path, path cut at Envoy's 256 characters
    assert a["http.url"] == "http://reviews" + ("/reviews/0?x=" + "a" * 300)[:256]
    assert a["http.method"] == "POST"
    assert a["http.protocol"] == "HTTP/1.1"
    assert a["user_agent"] == "curl/8.1"
    assert a["downstream_cluster"] == "-"
    assert a["peer.address"] == "127.0.0.1"
    assert a["http.status_code"] == "200"
    assert a["response_flags"] == "-"
    assert a["request_size"] == "5"
    assert a["response_size"] == "12"
    assert a["upstream_cluster"] == a["upstream_cluster.name"] == "outbound|80||reviews"
    b = server.attributes
    assert {k: b.get(k) for k in static} == static
    assert b["http.url"] == "http://reviews:9080/in"
    assert b["downstream_cluster"] == "productpage"
    assert b["user_agent"] == "-"
    assert b["upstream_cluster"] == "inbound|9080||"
    assert b["request_size"] == "0"


async def test_a_collector_path_is_on_the_control_plane_the_sidecar_talks_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The embedded collector comes as a path: the sidecar joins it to its control plane's URL
    (the address it reaches it by); a sidecar without a control plane exports nothing."""
    async with FakeUpstream() as app, FakeUpstream(Response(body=b"")) as collector:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh={"tracing": {"sampling": 100.0, "otlp_endpoint": "/telemetry/v1/traces"}},
        )
        with caplog.at_level(logging.WARNING, logger="diktyo.proxy"):
            async with start_sidecar(snap) as sc:
                assert sc.sidecar.rt.tracer is None
        assert "is a path on the control plane, and this sidecar has none" in caplog.text
        async with start_sidecar(http_snapshot({"reviews": [("127.0.0.1", app.port)]})) as sc:
            # as main.py does with its ConfigClient: only ``.url`` is read
            sc.sidecar.control_plane = SimpleNamespace(url=f"http://127.0.0.1:{collector.port}")
            sc.sidecar.apply(msgspec.structs.replace(snap, version="2"))
            assert sc.sidecar.exporter.endpoint == (
                f"http://127.0.0.1:{collector.port}/telemetry/v1/traces"
            )
            r = await http_request(sc.port(), "GET", "http://reviews/x")
            assert r.status == 200
            (span,) = await _spans(collector, 1)
            assert collector.requests[0].path == "/telemetry/v1/traces"
            assert span.name == "reviews:80/*"


async def test_a_request_answered_before_a_cluster_is_chosen_gets_a_span() -> None:
    """Envoy traces every request its connection manager handles: a request that no route
    matches (404 NR, no cluster chosen, the tracing filter's route stage never ran) gets a
    span too, continuing the caller's trace, with the status and the response flags and
    without the upstream cluster tags (stop 21, tidy). It used to get none."""
    async with (
        FakeUpstream() as app,
        FakeUpstream(Response(body=b"")) as collector,
    ):
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh=_traced(collector),
        )
        async with start_sidecar(snap) as sc:
            parent_trace = "0af7651916cd43dd8448eb211c80319c"
            r = await http_request(
                sc.port(),
                "GET",
                "http://nowhere/x",
                {"traceparent": f"00-{parent_trace}-b7ad6b7169203331-01", "x-request-id": "rid-9"},
            )
            assert r.status == 404
            (span,) = await _spans(collector, 1)
    assert app.requests == []
    assert span.trace_id == parent_trace
    assert span.kind == "client"
    assert span.name == "nowhere/*"
    a = span.attributes
    assert a["http.status_code"] == "404"
    assert a["response_flags"] == "NR"
    assert a["guid:x-request-id"] == "rid-9"
    assert a["http.url"] == "http://nowhere/x"
    assert "upstream_cluster" not in a and "upstream_cluster.name" not in a
    assert 0 <= span.end_ns - span.start_ns < 10_000_000_000

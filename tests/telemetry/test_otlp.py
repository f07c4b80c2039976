"""OTLP/HTTP export: a real receiver on 127.0.0.1 decodes what the exporter posts."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from diktyo.core.clock import ManualClock, make_random
from diktyo.telemetry.otlp import OtlpDecodeError, OtlpExporter, decode_spans, encode_spans
from diktyo.telemetry.tracing import Sampler, Span, extract, start_span


class Receiver:
    """A tiny real HTTP/1.1 server that keeps every request (path, headers, body)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.server: asyncio.base_events.Server | None = None
        self.got = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        headers = {}
        while (h := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((line.decode().split()[1], headers, body))
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        self.got.set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/traces"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def make_trace() -> tuple[Span, Span]:
    clock = ManualClock()
    rng = make_random(3)
    server = start_span(None, "productpage.default.svc.cluster.local:9080/*", "server",
                        Sampler(100), rng, clock, {"http.method": "GET", "node_id": "pp-1"})  # fmt: skip
    client = start_span(server.context, "reviews.default.svc.cluster.local:9080/*", "client",
                        Sampler(100), rng, clock, {"upstream_cluster": "outbound|9080|v2|reviews"})  # fmt: skip
    clock.advance(0.01)
    client.finish(clock, 503, "UO")
    clock.advance(0.01)
    server.finish(clock, 200)
    return server, client


def test_encode_decode_roundtrip() -> None:
    server, client = make_trace()
    body = encode_spans([server, client], "productpage.default", {"k8s.namespace.name": "default"})
    spans = decode_spans(body)
    assert [s.span_id for s in spans] == [server.span_id, client.span_id]
    assert spans[1].parent_id == server.span_id and spans[0].parent_id is None
    assert spans[1].kind == "client" and spans[1].status == "error"
    assert spans[1].attributes["http.status_code"] == 503
    assert spans[0].service == "productpage.default"
    assert spans[0].duration_ms == pytest.approx(20.0)


def test_decode_rejects_garbage() -> None:
    with pytest.raises(OtlpDecodeError):
        decode_spans(b"\xff\xff\xff\xff garbage")


async def test_exporter_posts_protobuf_to_a_real_receiver() -> None:
    rec = Receiver()
    async with rec as url:
        exp = OtlpExporter(
            url, batch_size=2, flush_interval=0.05, service_name="productpage.default"
        )
        exp.start()
        server, client = make_trace()
        exp.export(client)
        exp.export(server)
        await asyncio.wait_for(rec.got.wait(), 5)
        await exp.close()
    path, headers, body = rec.requests[0]
    assert path == "/v1/traces"
    assert headers["content-type"] == "application/x-protobuf"
    req = trace_service_pb2.ExportTraceServiceRequest()
    req.ParseFromString(body)  # the package's own decoder
    spans = list(req.resource_spans[0].scope_spans[0].spans)
    assert {s.trace_id.hex() for s in spans} == {server.trace_id}
    by_id = {s.span_id.hex(): s for s in spans}
    assert by_id[client.span_id].parent_span_id.hex() == server.span_id
    attrs = {kv.key: kv.value for kv in by_id[client.span_id].attributes}
    assert attrs["upstream_cluster"].string_value == "outbound|9080|v2|reviews"
    assert attrs["response_flags"].string_value == "UO"
    assert exp.exported == 2 and exp.dropped == 0 and exp.failed == 0


async def test_export_never_blocks_and_counts_drops() -> None:
    exp = OtlpExporter("http://127.0.0.1:9/v1/traces", max_queue=3, flush_interval=60)
    server, _ = make_trace()
    for _ in range(5):
        exp.export(server)  # no loop task started: nothing is sent, queue fills
    assert exp.queued == 3 and exp.dropped == 2
    await exp.close(close_timeout=2)  # port 9 refuses: counted as failed, not raised
    assert exp.failed == 3 and exp.queued == 0
    exp.export(server)
    assert exp.dropped == 3  # closed exporters drop


async def test_collector_errors_are_counted_not_raised() -> None:
    rec = Receiver(status=500)
    async with rec as url:
        exp = OtlpExporter(url, batch_size=1, flush_interval=0.05)
        async with exp:
            exp.export(make_trace()[0])
            await asyncio.wait_for(rec.got.wait(), 5)
        assert exp.failed == 1 and exp.exported == 0


def test_bad_endpoint_is_explained() -> None:
    with pytest.raises(ValueError, match="http://host:4318/v1/traces"):
        OtlpExporter("localhost:4318")


async def test_close_cancels_the_task() -> None:
    exp = OtlpExporter("http://127.0.0.1:9/v1/traces", flush_interval=0.01)
    exp.start()
    await asyncio.sleep(0.03)  # real time: a few flush intervals run before close
    await exp.close()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(n.startswith("otlp-exporter") for n in names)


def test_extract_then_export_keeps_incoming_trace() -> None:
    ctx = extract({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    span = start_span(ctx, "x", "server", Sampler(1), make_random(0), ManualClock())
    (decoded,) = decode_spans(encode_spans([span], "svc"))
    assert decoded.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert decoded.parent_id == "00f067aa0ba902b7"

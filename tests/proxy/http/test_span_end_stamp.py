"""A traced stream's span ends when its response is handed to the transport, not when the
sidecar gets round to finishing the stream (a caller could otherwise end its span first)."""

from __future__ import annotations

from random import Random

from diktyo.core.clock import ManualClock
from diktyo.proxy.codec.events import RequestHead
from diktyo.proxy.http.tracer import Tracer


def _head() -> RequestHead:
    head = RequestHead({"host": "reviews:9080"})
    head.path, head.authority = "/x", "reviews:9080"
    return head


class Collect:
    def __init__(self) -> None:
        self.spans: list[object] = []

    def export(self, span: object) -> None:
        self.spans.append(span)


def test_the_end_stamped_at_the_response_write_is_the_span_end() -> None:
    clock = ManualClock()
    out = Collect()
    tracer = Tracer(100.0, Random(1), clock, out, "sidecar~127.0.0.1~a.default~cluster.local")
    head = _head()
    span = tracer.begin_request(head, "127.0.0.1", "server", "reviews:9080/*")
    clock.advance(0.002)
    tracer.responded(span)  # the last response byte is about to be written
    written = span.end_ns
    clock.advance(0.005)  # the sidecar is descheduled before it finishes the stream
    tracer.end(span, 200, "-", "inbound|9080||")
    assert out.spans == [span]
    assert span.end_ns == written
    assert round((span.end_ns - span.start_ns) / 1000) == 2_000  # µs (float clock)


def test_without_a_stamp_the_span_ends_when_the_stream_finishes() -> None:
    clock = ManualClock()
    tracer = Tracer(100.0, Random(1), clock, Collect(), "node")
    head = _head()
    span = tracer.begin_request(head, "127.0.0.1", "client", "reviews:9080/*")
    clock.advance(0.003)
    tracer.end(span, 404, "NR", "")
    assert round((span.end_ns - span.start_ns) / 1000) == 3_000  # µs (float clock)

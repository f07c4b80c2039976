"""CPU cost of one request through the `h2` library (and diktyo's two HTTP/2 codecs, on `h2` and
on libnghttp2), in memory: the codec's share of a proxied request.

A sidecar proxying one HTTP/2 request runs the codec twice: as a *server* for the downstream
(decode HEADERS, encode the response HEADERS + DATA) and as a *client* for the upstream (encode
HEADERS, decode the response). One in-memory round trip between an `h2` client connection and an
`h2` server connection is exactly that work, without sockets, event loop or proxy logic:

    client.send_headers -> bytes -> server.receive_data -> RequestReceived
    server.send_headers + send_data(end) -> bytes -> client.receive_data -> ResponseReceived ...

The same round trip on HTTP/1.1 (httptools parses the request and the response; the heads are
encoded with one bytes join, as `proxy/codec/http1.py` does) is the baseline. Streams run
``--concurrency`` at a time on one connection (a multiplexed pool), and WINDOW_UPDATEs are
sent as a proxy would (acknowledge what was read).

    .venv/bin/python bench/micro/h2_codec.py [--requests 20000] [--concurrency 10] [--body 100]

Prints microseconds of CPU per round trip (process time, best of ``--reps``) per variant.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httptools

REQ_HEADERS = [
    (":method", "GET"),
    (":scheme", "http"),
    (":authority", "reviews.default.svc.cluster.local:9080"),
    (":path", "/reviews/0"),
    ("user-agent", "h2load nghttp2/1.52.0"),
    ("accept", "*/*"),
    ("x-request-id", "4f6d0c8e-54b5-4c6b-9d2e-7e5b7e7c1a2f"),
    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]
RESP_HEADERS_BASE = [
    (":status", "200"),
    ("content-type", "text/plain"),
    ("server", "envoy"),
    ("x-envoy-upstream-service-time", "1"),
]


def pair(validate: bool) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    def cfg(client: bool) -> h2.config.H2Configuration:
        return h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=validate,
            normalize_inbound_headers=validate,
        )

    client = h2.connection.H2Connection(cfg(True))
    server = h2.connection.H2Connection(cfg(False))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
    )
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def run_h2(n: int, conc: int, body: bytes, validate: bool) -> float:
    client, server = pair(validate)
    resp_headers = [*RESP_HEADERS_BASE, ("content-length", str(len(body)))]
    done = 0
    t0 = time.process_time()
    while done < n:
        batch = min(conc, n - done)
        for _ in range(batch):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, REQ_HEADERS, end_stream=True)
        for ev in server.receive_data(client.data_to_send()):
            if isinstance(ev, h2.events.RequestReceived):
                server.send_headers(ev.stream_id, resp_headers)
                server.send_data(ev.stream_id, body, end_stream=True)
        ended = 0
        for ev in client.receive_data(server.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended += 1
        # the server reads the WINDOW_UPDATEs, as it would on the wire
        server.receive_data(client.data_to_send())
        assert ended == batch, (ended, batch)
        done += batch
    return (time.process_time() - t0) / n


class _Sink:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = 0

    def on_message_complete(self) -> None:
        self.done += 1


def run_h1(n: int, conc: int, body: bytes, validate: bool) -> float:
    del validate
    req_sink, resp_sink = _Sink(), _Sink()
    req_parser = httptools.HttpRequestParser(req_sink)
    resp_parser = httptools.HttpResponseParser(resp_sink)
    head = b"".join(
        [b"GET /reviews/0 HTTP/1.1\r\nhost: reviews.default.svc.cluster.local:9080\r\n"]
        + [f"{k}: {v}\r\n".encode() for k, v in REQ_HEADERS[4:]]
        + [b"\r\n"]
    )
    resp_lines = [f"{k}: {v}\r\n".encode() for k, v in RESP_HEADERS_BASE[1:]]
    t0 = time.process_time()
    for _ in range(n):
        req_parser.feed_data(head)
        out = b"".join(
            [b"HTTP/1.1 200 OK\r\n", *resp_lines, b"content-length: %d\r\n\r\n" % len(body), body]
        )
        resp_parser.feed_data(out)
    assert req_sink.done == n and resp_sink.done == n
    return (time.process_time() - t0) / n


class _Null:
    """A sink for both sides that acknowledges nothing itself (the loop below does)."""

    def __init__(self) -> None:
        self.ended = 0
        self.requests: list[int] = []
        self.codec: Any = None

    def on_request_headers(self, sid: int, head: object) -> None:
        self.requests.append(sid)

    def on_response_end(self, sid: int) -> None:
        self.ended += 1

    def on_response_data(self, sid: int, data: bytes) -> None:
        self.codec.acknowledge(sid, len(data))  # as the pool does: credit what was passed on

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a: None


def run_diktyo(n: int, conc: int, body: bytes, validate: bool) -> float:
    """The same round trip through diktyo's codecs (``proxy/codec/http2.py`` on `h2`, or
    ``http2_nghttp2.py`` on libnghttp2 when ``validate`` is the string "nghttp2"): what the
    sidecar runs, flood checks and event translation included."""
    from diktyo.proxy.codec.events import RequestHead, ResponseHead
    from diktyo.proxy.codec.http2_select import select_codec

    if isinstance(validate, str):  # "nghttp2-api" / "nghttp2-abi": libnghttp2 in that cffi mode
        from diktyo.proxy.codec import http2_nghttp2

        http2_nghttp2.reload_mode(abi=validate == "nghttp2-abi")
    server_cls, client_cls, _ = select_codec("nghttp2" if validate else "h2")
    cs, ss = _Null(), _Null()
    client, server = client_cls(cs), server_cls(ss)
    cs.codec = client
    server.feed(client.data_to_send())
    client.feed(server.data_to_send())
    server.feed(client.data_to_send())
    head = RequestHead({k: v for k, v in REQ_HEADERS[4:]} | {"host": REQ_HEADERS[2][1]})
    head.path = "/reviews/0"
    resp = ResponseHead(
        200, [(k.encode(), v.encode()) for k, v in RESP_HEADERS_BASE[1:]]
        + [(b"content-length", str(len(body)).encode())], None, True,
    )  # fmt: skip
    done = 0
    t0 = time.process_time()
    while done < n:
        batch = min(conc, n - done)
        for _ in range(batch):
            client.send_headers(client.new_stream(), head, end_stream=True)
        server.feed(client.data_to_send())
        for sid in ss.requests:
            server.send_headers(sid, resp)
            server.send_data(sid, body, end_stream=True)
        ss.requests.clear()
        before = cs.ended
        client.feed(server.data_to_send())
        server.feed(client.data_to_send())
        assert cs.ended - before == batch
        done += batch
    return (time.process_time() - t0) / n


def best(fn: Callable[[int, int, bytes, bool], float], reps: int, *args: object) -> float:
    return min(fn(*args) for _ in range(reps))  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--body", type=int, default=100, help="response body bytes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="run the variants whose name has this word")
    a = ap.parse_args()
    body = b"x" * a.body
    import h2 as h2pkg

    print(
        f"h2 {h2pkg.__version__}, {a.requests} requests, {a.concurrency} streams at a time, "
        f"{a.body} B body; CPU us per round trip (client+server side), best of {a.reps}"
    )
    rows = [
        ("http1 (httptools)", run_h1, False),
        ("h2, header validation on", run_h2, True),
        ("h2, header validation off", run_h2, False),
        ("diktyo's codecs (on h2)", run_diktyo, True),
        ("diktyo's codecs (nghttp2, cffi ABI)", run_diktyo, "nghttp2-abi"),
        ("diktyo's codecs (nghttp2, cffi API)", run_diktyo, "nghttp2-api"),
    ]
    for name, fn, validate in rows:
        if a.only and a.only not in name:
            continue
        us = best(fn, a.reps, a.requests, a.concurrency, body, validate) * 1e6
        print(f"  {name:36s} {us:8.1f} us   (~{1e6 / us:,.0f} round trips per CPU-second)")


if __name__ == "__main__":
    main()

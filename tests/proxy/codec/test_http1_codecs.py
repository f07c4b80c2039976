"""The HTTP/1.1 codecs behind the neutral interface (``codec.events``): all framing lives here."""

from __future__ import annotations

from typing import Any

from diktyo.proxy.codec.events import RequestHead, ResetReason, ResponseHead
from diktyo.proxy.codec.http1 import Http1ClientCodec, Http1ServerCodec


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.events.append((name, *args))


def server(raw: bytes) -> tuple[Http1ServerCodec, Sink]:
    sink = Sink()
    codec = Http1ServerCodec(sink)  # type: ignore[arg-type]  # records every event
    codec.feed(raw)
    return codec, sink


def test_server_numbers_pipelined_requests_and_emits_neutral_events() -> None:
    _, sink = server(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    names = [(e[0], e[1]) for e in sink.events]
    assert names == [
        ("on_request_headers", 1),
        ("on_request_data", 1),
        ("on_request_end", 1),
        ("on_request_headers", 2),
        ("on_request_end", 2),
    ]
    head = sink.events[0][2]
    assert (head.method, head.path, head.authority, head.scheme) == ("POST", "/a", "x", "http")


def test_server_chunks_a_response_without_length_and_ends_it() -> None:
    codec, _ = server(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    codec.send_headers(1, ResponseHead(200, [(b"x-a", b"1")]))
    codec.send_data(1, b"hello")
    codec.send_data(1, b"", end_stream=True)
    assert codec.data_to_send() == (
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert codec.reusable


def test_server_keeps_a_content_length_and_sends_trailers_only_when_chunked() -> None:
    codec, _ = server(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    codec.send_headers(
        1, ResponseHead(200, raw=b"content-length: 2\r\n\r\n", has_content_length=True)
    )
    codec.send_data(1, b"ok")
    codec.send_trailers(1, [(b"grpc-status", b"0")])
    assert codec.data_to_send() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    codec, _ = server(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    codec.send_headers(1, ResponseHead(200, []))
    codec.send_trailers(1, [(b"grpc-status", b"0")])
    assert codec.data_to_send().endswith(b"\r\n\r\n0\r\ngrpc-status: 0\r\n\r\n")


def test_server_head_request_gets_no_body_and_http10_is_close_delimited() -> None:
    codec, _ = server(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    codec.send_headers(1, ResponseHead(200, [(b"content-length", b"5")], has_content_length=True))
    codec.send_data(1, b"hello", end_stream=True)
    assert codec.data_to_send() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    codec, _ = server(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    codec.send_headers(1, ResponseHead(200, []))
    codec.send_data(1, b"abc", end_stream=True)
    assert codec.data_to_send() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc"
    assert not codec.reusable


def test_server_confirms_http10_keep_alive_and_drain_closes() -> None:
    codec, _ = server(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    codec.send_headers(1, ResponseHead(204, []), end_stream=True)
    assert codec.data_to_send() == b"HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n"
    codec, _ = server(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    codec.drain()
    codec.send_headers(1, ResponseHead(204, []), end_stream=True)
    assert codec.data_to_send() == b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
    assert not codec.reusable


def test_server_continue_and_errors() -> None:
    codec, _ = server(
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    )
    codec.send_continue(1)
    assert codec.data_to_send() == b"HTTP/1.1 100 Continue\r\n\r\n"
    codec.send_error(408, "request header timeout")
    out = codec.data_to_send()
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in out


def req(method: str = "GET", **kw: Any) -> RequestHead:
    h = RequestHead({"host": "up"})
    h.method = method
    h.path = "/p"
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def test_client_frames_the_request_body() -> None:
    c = Http1ClientCodec(Sink())  # type: ignore[arg-type]
    sid = c.new_stream()
    c.send_headers(sid, req("POST", has_body=True, content_length=2))
    c.send_data(sid, b"hi", end_stream=True)
    assert c.data_to_send() == b"POST /p HTTP/1.1\r\nhost: up\r\ncontent-length: 2\r\n\r\nhi"
    sid = c.new_stream()
    c.send_headers(sid, req("POST", has_body=True))  # no length known: chunked
    c.send_data(sid, b"abc")
    c.send_data(sid, b"", end_stream=True)
    assert c.data_to_send() == (
        b"POST /p HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    sid = c.new_stream()
    c.send_headers(sid, req("POST", chunked=True, has_body=True), end_stream=True)
    assert c.data_to_send().endswith(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")


def test_client_decodes_a_response_into_neutral_events() -> None:
    sink = Sink()
    c = Http1ClientCodec(sink)  # type: ignore[arg-type]
    sid = c.new_stream()
    c.send_headers(sid, req(), end_stream=True)
    c.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok")
    kinds = [e[0] for e in sink.events]
    assert kinds == ["on_response_headers", "on_response_data", "on_response_end"]
    head = sink.events[0][2]
    assert head.status == 200 and head.has_content_length
    assert head.pairs() == [(b"X-A", b"1"), (b"Content-Length", b"2")]  # hop-by-hop removed
    assert not c.keep_alive


def test_client_head_request_expects_no_body_and_reset_stops_reuse() -> None:
    sink = Sink()
    c = Http1ClientCodec(sink)  # type: ignore[arg-type]
    c.send_headers(c.new_stream(), req("HEAD"), end_stream=True)
    c.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert [e[0] for e in sink.events] == ["on_response_headers", "on_response_end"]
    assert c.keep_alive
    c.send_reset(1, ResetReason.LOCAL_RESET)
    assert not c.keep_alive

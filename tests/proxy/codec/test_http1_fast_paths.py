"""Two shortcuts of the HTTP/1.1 codec (issue 11, `sat`) give what the long way gives:
the request decoder notes whether any hop-by-hop header name came (``RequestHead.hop_by_hop``:
False lets the stream skip its search), and the response decoder finds the status line by
comparing it with the status's usual one before searching for it."""

from __future__ import annotations

from typing import Any

import pytest

from diktyo.proxy.codec.http1 import HOP_BY_HOP_STR, RequestDecoder, RequestHead, ResponseDecoder


class ReqSink:
    def __init__(self) -> None:
        self.heads: list[RequestHead] = []

    def on_request_head(self, head: RequestHead) -> None:
        self.heads.append(head)

    def on_request_body(self, chunk: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        pass


def head_of(extra: bytes) -> RequestHead:
    s = ReqSink()
    RequestDecoder(s).feed(b"POST / HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n")
    (h,) = s.heads
    return h


def test_no_hop_by_hop_name() -> None:
    h = head_of(b"User-Agent: x\r\nAccept: */*\r\nX-Connection: close\r\n")
    assert h.hop_by_hop is False
    assert HOP_BY_HOP_STR.isdisjoint(h.headers)


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP_STR - {"transfer-encoding"}))
def test_each_hop_by_hop_name_is_noted(name: str) -> None:
    value = b"3" if name == "content-length" else b"x"
    if name == "expect":
        value = b"100-continue"
    h = head_of(name.title().encode() + b": " + value + b"\r\n")
    assert h.hop_by_hop is True


def test_chunked_request_is_noted() -> None:
    assert head_of(b"Transfer-Encoding: chunked\r\n").hop_by_hop is True


def test_the_flag_is_per_request_on_a_keep_alive_connection() -> None:
    s = ReqSink()
    d = RequestDecoder(s)
    d.feed(b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n")
    d.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [h.hop_by_hop for h in s.heads] == [True, False]


class RespSink:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_response_head(self, status: int, block: bytes, ka: bool) -> None:
        self.events.append((status, block))

    def on_response_body(self, chunk: bytes) -> None:
        self.events.append(chunk)

    def on_response_end(self) -> None:
        self.events.append("end")


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 200 OK\r\n",  # the usual line: compared
        b"HTTP/1.1 200 Fine\r\n",  # another reason phrase: searched
        b"HTTP/1.1 200 \r\n",
        b"HTTP/1.1 599 Custom\r\n",  # no usual line for the status
        b"\r\nHTTP/1.1 200 OK\r\n",  # an empty line first (llhttp skips it)
    ],
)
@pytest.mark.parametrize("headers", [b"", b"Server: s\r\nContent-Length: 2\r\n"])
def test_the_header_block_is_cut_after_the_status_line(line: bytes, headers: bytes) -> None:
    s = RespSink()
    d = ResponseDecoder(s)
    body = b"ok" if headers else b""
    d.feed(line + headers + b"\r\n" + body)
    if not headers:
        d.eof()  # close-delimited
    status = int(line.split()[1])
    assert s.events[0] == (status, headers + b"\r\n")
    assert s.events[-1] == "end"


def test_a_head_split_inside_the_status_line() -> None:
    s = RespSink()
    d = ResponseDecoder(s)
    msg = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for cut in (3, 12, 16, 17):
        s.events.clear()
        d.feed(msg[:cut])
        d.feed(msg[cut:])
        assert s.events == [(200, b"Content-Length: 2\r\n\r\n"), b"ok", "end"], cut

"""HTTP/1.1 codec: request/response decoding, limits, framing errors, and a Hypothesis fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diktyo.proxy.codec.http1 import (
    HOP_BY_HOP_LINE_RE,
    MAX_HEADER_BYTES,
    CodecError,
    RequestDecoder,
    RequestHead,
    ResponseDecoder,
    encode_header_block,
    encode_response_head,
    local_response,
    parse_header_block,
)


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_request_head(self, head: RequestHead) -> None:
        self.events.append(("head", head))

    def on_request_body(self, chunk: bytes) -> None:
        self.events.append(("body", chunk))

    def on_request_end(self) -> None:
        self.events.append(("end", None))

    def heads(self) -> list[RequestHead]:
        return [e[1] for e in self.events if e[0] == "head"]  # type: ignore[misc]

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "body")  # type: ignore[misc]


def decode(data: bytes) -> Sink:
    s = Sink()
    RequestDecoder(s).feed(data)
    return s


def test_origin_form_request() -> None:
    s = decode(b"GET /a?b=1 HTTP/1.1\r\nHost: Reviews:9080\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
    (h,) = s.heads()
    assert (h.method, h.path, h.authority, h.keep_alive) == ("GET", "/a?b=1", "Reviews:9080", True)
    assert h.headers["x-a"] == "1, 2"
    assert s.events[-1] == ("end", None)


def test_absolute_form_sets_authority_and_host() -> None:
    (h,) = decode(b"GET http://reviews:9080/x?y HTTP/1.1\r\nHost: other\r\n\r\n").heads()
    assert h.path == "/x?y"
    assert h.authority == "reviews:9080"
    assert h.headers["host"] == "reviews:9080"


def test_pipelined_requests_in_one_buffer() -> None:
    s = decode(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert [h.path for h in s.heads()] == ["/1", "/2", "/3"]
    assert s.body() == b"abc"


def test_chunked_body_streams() -> None:
    s = Sink()
    d = RequestDecoder(s)
    d.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    assert s.heads()[0].chunked
    assert s.body() == b"hel"  # forwarded before the chunk is complete
    d.feed(b"lo\r\n0\r\n\r\n")
    assert s.body() == b"hello"
    assert s.events[-1] == ("end", None)


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 505),  # HTTP/0.9 (found by the fuzz test below)
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(120))
            + b"\r\n",
            431,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n",
            431,
        ),
    ],
)
def test_malformed_requests(raw: bytes, status: int) -> None:
    s = Sink()
    with pytest.raises(CodecError) as ei:
        RequestDecoder(s).feed(raw)
    assert ei.value.status == status
    assert s.heads() == []


def test_expect_continue_and_upgrade_flags() -> None:
    (h,) = decode(
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    ).heads()
    assert h.expect_continue
    # a WebSocket upgrade: what follows the head is the tunnel's bytes, not another request
    s = decode(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert [h.path for h in s.heads()] == ["/"]
    assert s.heads()[0].upgrade and s.heads()[0].upgrade_to == "websocket"
    assert s.body() == b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    # any other upgrade is not supported: the request is a plain one, parsing goes on
    s = decode(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert [h.path for h in s.heads()] == ["/", "/next"]
    assert s.heads()[0].upgrade and not s.heads()[0].upgrade_to


class RSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.blocks: list[bytes] = []

    def on_response_head(self, status: int, block: bytes, ka: bool) -> None:
        self.events.append(("head", (status, ka)))
        self.blocks.append(block)

    def on_response_body(self, chunk: bytes) -> None:
        self.events.append(("body", chunk))

    def on_response_end(self) -> None:
        self.events.append(("end", None))


def test_response_head_request_has_no_body() -> None:
    r = RSink()
    d = ResponseDecoder(r)
    d.expect_no_body()
    d.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert r.events == [("head", (200, True)), ("end", None)]
    d.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert r.events[-2:] == [("head", (204, True)), ("end", None)]


def test_response_close_delimited_ends_on_eof() -> None:
    r = RSink()
    d = ResponseDecoder(r)
    d.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert r.events == [("head", (200, False)), ("body", b"abc")]
    assert d.eof()
    assert r.events[-1] == ("end", None)


def test_interim_100_is_swallowed() -> None:
    r = RSink()
    ResponseDecoder(r).feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert r.events == [("head", (201, True)), ("end", None)]


def test_encoders() -> None:
    assert encode_response_head(200, [(b"a", b"b")], b"") == b"HTTP/1.1 200 OK\r\na: b\r\n\r\n"
    lr = local_response(503, b"no healthy upstream")
    assert lr.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert lr.endswith(b"\r\n\r\nno healthy upstream")


_tokens = st.sampled_from(
    [
        b"GET ",
        b"POST ",
        b"/",
        b"http://a/",
        b" HTTP/1.1\r\n",
        b"HTTP/1.0",
        b"Host: a\r\n",
        b"Content-Length: 5\r\n",
        b"Content-Length: 2\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"5\r\nhello\r\n",
        b"0\r\n\r\n",
        b"abc",
        b":",
        b"\x00",
        b"\xff",
        b" ",
        b"\n",
        b"Expect: 100-continue\r\n",
        b"Connection: close\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_tokens, st.binary(max_size=20)), max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_fuzz_request_decoder_never_crashes(parts: list[bytes], split: int) -> None:
    data = b"".join(parts)
    s = Sink()
    d = RequestDecoder(s)
    try:
        for i in range(0, len(data), split):
            d.feed(data[i : i + split])
    except CodecError as exc:
        # the documented answers only (an HTTP/0.9 or 2.0 request line gets 505, a
        # transfer-encoding other than chunked 501; found by this test)
        assert exc.status in {400, 413, 426, 431, 501, 505}, exc
    # every head has a method and a path
    for h in s.heads():
        assert h.method and h.path


def test_response_header_block_across_reads_and_hop_by_hop_removal() -> None:
    r = RSink()
    d = ResponseDecoder(r)
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nServer: x\r\n"
        b"Connection: keep-alive\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    for i in range(0, len(raw), 7):  # split anywhere, even inside the head
        d.feed(raw[i : i + 7])
    assert r.events[0] == ("head", (200, True))
    assert r.events[-1] == ("end", None)
    (block,) = r.blocks
    assert block == (
        b"Server: x\r\nConnection: keep-alive\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nContent-Length: 3\r\n\r\n"
    )
    clean = HOP_BY_HOP_LINE_RE.sub(b"", block)
    assert b"Connection" not in clean
    assert parse_header_block(clean) == [
        (b"Server", b"x"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Length", b"3"),
    ]
    assert encode_header_block(parse_header_block(clean)) == clean


_HDR_NAMES = [
    b"Connection",
    b"keep-alive",
    b"Content-Length",
    b"TE",
    b"te-x",
    b"Transfer-Encoding",
    b"Upgrade",
    b"trailer",
    b"Proxy-Connection",
    b"connectionx",
    b"Set-Cookie",
    b"content-lengthy",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_HDR_NAMES),
            st.sampled_from([b":", b" :", b"\t:", b": "]),
            st.sampled_from([b"", b"v", b" a b ", b"\t1", b"x\ry"]),
        ),
        max_size=6,
    )
)
def test_strip_hop_by_hop_matches_the_multiline_regex(
    lines: list[tuple[bytes, bytes, bytes]],
) -> None:
    from diktyo.proxy.codec.http1 import CONTENT_LENGTH_RE, strip_hop_by_hop

    block = b"".join(n + s + v + b"\r\n" for n, s, v in lines) + b"\r\n"
    expected = HOP_BY_HOP_LINE_RE.sub(b"", block)
    got, has_cl = strip_hop_by_hop(block)
    assert got == expected
    assert has_cl == (CONTENT_LENGTH_RE.search(expected) is not None)


def test_empty_lines_before_the_status_line_are_not_part_of_the_header_block() -> None:
    # regression found by tests/fuzz: the status line was cut into the forwarded block
    for raw in (b"\r\nHTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok",
                b"\n\r\nHTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok"):  # fmt: skip
        r = RSink()
        ResponseDecoder(r).feed(raw)
        assert r.blocks == [b"Server: x\r\nContent-Length: 2\r\n\r\n"]

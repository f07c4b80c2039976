"""The request decoder reads "HTTP/1.1" from the read itself when a head begins at its first
byte (issue 11, `sat`), and asks httptools otherwise: every way a head can sit in the reads
must give the version llhttp parsed (pipelined, split, after empty lines, HTTP/1.0, 505)."""

from __future__ import annotations

import pytest

from diktyo.proxy.codec.http1 import CodecError, RequestDecoder, RequestHead


class Sink:
    def __init__(self) -> None:
        self.heads: list[RequestHead] = []
        self.ends = 0

    def on_request_head(self, head: RequestHead) -> None:
        self.heads.append(head)

    def on_request_body(self, chunk: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        self.ends += 1


def versions(*reads: bytes) -> list[tuple[str, str, bool]]:
    s = Sink()
    d = RequestDecoder(s)
    for r in reads:
        d.feed(r)
    return [(h.version, h.path, h.keep_alive) for h in s.heads]


R11 = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
# HTTP/1.0 keep-alive: llhttp refuses bytes after an HTTP/1.0 request that closes
R10 = b"GET /b HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
R10_CLOSE = b"GET /c HTTP/1.0\r\nHost: h\r\n\r\n"


def test_one_request_per_read() -> None:
    assert versions(R11, R10, R11, R10_CLOSE) == [
        ("1.1", "/a", True),
        ("1.0", "/b", True),
        ("1.1", "/a", True),
        ("1.0", "/c", False),
    ]


def test_pipelined_requests_of_both_versions_in_one_read() -> None:
    # only the first head of a read starts at its first byte; the others are asked for
    assert versions(R11 + R10 + R11) == [
        ("1.1", "/a", True),
        ("1.0", "/b", True),
        ("1.1", "/a", True),
    ]
    assert versions(R10 + R11) == [("1.0", "/b", True), ("1.1", "/a", True)]
    assert versions(R11 + R10_CLOSE) == [("1.1", "/a", True), ("1.0", "/c", False)]


def test_heads_split_across_reads() -> None:
    for cut in range(1, len(R10)):
        assert versions(R10[:cut], R10[cut:]) == [("1.0", "/b", True)], cut
    for cut in range(1, len(R11)):
        assert versions(R11[:cut], R11[cut:]) == [("1.1", "/a", True)], cut


def test_a_head_after_the_end_of_a_body_in_the_same_read() -> None:
    post = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"
    assert versions(post + b"ab", b"c" + R10) == [("1.1", "/p", True), ("1.0", "/b", True)]


def test_empty_lines_before_a_request_line() -> None:
    assert versions(R11, b"\r\n" + R10) == [("1.1", "/a", True), ("1.0", "/b", True)]
    assert versions(R11, b"\r\n" + R11) == [("1.1", "/a", True), ("1.1", "/a", True)]


def test_a_url_that_looks_like_a_version_is_not_taken_for_one() -> None:
    r = b"GET /x%20HTTP/1.1 HTTP/1.0\r\nHost: h\r\n\r\n"
    assert versions(r) == [("1.0", "/x%20HTTP/1.1", False)]
    assert versions(R11, r) == [("1.1", "/a", True), ("1.0", "/x%20HTTP/1.1", False)]


@pytest.mark.parametrize("first", [b"", R11])
def test_http_20_is_still_refused(first: bytes) -> None:
    d = RequestDecoder(Sink())
    if first:
        d.feed(first)
    with pytest.raises(CodecError) as e:
        d.feed(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n")
    assert e.value.status == 505


def test_http_10_refused_when_not_accepted_after_an_http_11_request() -> None:
    s = Sink()
    d = RequestDecoder(s, accept_http_10=False)
    d.feed(R11)
    with pytest.raises(CodecError) as e:
        d.feed(R10)
    assert e.value.status == 426
    assert [h.path for h in s.heads] == ["/a"]

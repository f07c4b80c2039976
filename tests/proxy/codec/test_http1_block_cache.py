"""Response header blocks are analysed once and reused (issue 11, fewer allocations): the
cached facts equal the regex results, a repeated block runs no regex, and the cache stays
bounded."""

from __future__ import annotations

from typing import Any

import pytest

from diktyo.proxy.codec import http1
from diktyo.proxy.codec.http1 import HOP_BY_HOP_LINE_RE, ResponseDecoder, strip_hop_by_hop

BLOCK = (
    b"Server: nginx\r\nDate: Sat, 28 Nov 2026 10:00:00 GMT\r\nContent-Length: 3\r\n"
    b"Connection: keep-alive\r\n\r\n"
)


class CountingSub:
    """Stands in for the hop-by-hop pattern: counts the regex passes."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def sub(self, repl: bytes, s: bytes) -> bytes:
        self.calls += 1
        out: bytes = self.real.sub(repl, s)
        return out


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingSub:
    c = CountingSub(http1._HOP_BY_HOP_NL_RE)
    monkeypatch.setattr(http1, "_HOP_BY_HOP_NL_RE", c)
    http1._BLOCK_CACHE.clear()  # in place: compiled, the cache is a Final static
    return c


def test_a_repeated_block_is_analysed_once(counting: CountingSub) -> None:
    first = strip_hop_by_hop(bytes(BLOCK))
    again = strip_hop_by_hop(bytes(BLOCK))  # an equal block, a different object
    assert first == again == (HOP_BY_HOP_LINE_RE.sub(b"", BLOCK), True)
    assert b"Connection" not in first[0]
    assert counting.calls == 1


def test_decoder_and_codec_share_one_analysis_per_block(counting: CountingSub) -> None:
    got: list[Any] = []

    class Sink:
        def on_response_headers(self, sid: int, head: Any) -> None:
            got.append((head.status, head.raw, head.has_content_length))

        def on_response_data(self, sid: int, data: bytes) -> None:
            got.append(data)

        def on_response_end(self, sid: int) -> None:
            got.append("end")

    codec = http1.Http1ClientCodec(Sink())  # type: ignore[arg-type]
    for _ in range(3):
        codec.feed(b"HTTP/1.1 200 OK\r\n" + BLOCK + b"ok\n")
    assert got[:3] == [(200, HOP_BY_HOP_LINE_RE.sub(b"", BLOCK), True), b"ok\n", "end"]
    assert got[3:6] == got[:3] == got[6:]
    assert counting.calls == 1  # the framing check, the strip and the content-length: one pass
    assert codec.keep_alive


def test_the_cache_is_bounded(counting: CountingSub) -> None:
    for i in range(http1.BLOCK_CACHE_SIZE + 50):
        strip_hop_by_hop(b"X-N: %d\r\n\r\n" % i)
    assert len(http1._BLOCK_CACHE) <= http1.BLOCK_CACHE_SIZE
    big = b"X-Big: " + b"a" * http1.BLOCK_CACHE_ENTRY_MAX + b"\r\n\r\n"
    assert strip_hop_by_hop(big) == (big, False)
    assert big not in http1._BLOCK_CACHE


def test_unframed_response_is_still_close_delimited(counting: CountingSub) -> None:
    events: list[Any] = []

    class RSink:
        def on_response_head(self, status: int, block: bytes, ka: bool) -> None:
            events.append(ka)

        def on_response_body(self, chunk: bytes) -> None:
            events.append(chunk)

        def on_response_end(self) -> None:
            events.append("end")

    for _ in range(2):  # the second time from the cache
        d = ResponseDecoder(RSink())
        d.feed(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nabc")
        assert d.eof()
    assert events == [False, b"abc", "end", False, b"abc", "end"]


def test_a_valid_authority_is_checked_once_and_a_bad_one_never_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[str] = []
    real = http1._BAD_AUTHORITY

    def counting(a: str) -> Any:
        checked.append(a)
        return real(a)

    monkeypatch.setattr(http1, "_BAD_AUTHORITY", counting)
    http1._GOOD_AUTHORITIES.clear()  # in place: compiled, the set is a Final static
    from diktyo.proxy.codec.http1 import CodecError, RequestDecoder

    class Sink:
        def on_request_head(self, head: Any) -> None:
            pass

        def on_request_body(self, chunk: bytes) -> None:
            pass

        def on_request_end(self) -> None:
            pass

    d = RequestDecoder(Sink())
    d.feed(b"GET / HTTP/1.1\r\nHost: a.b:80\r\n\r\n" * 3)
    assert checked == ["a.b:80"]
    for _ in range(2):  # rejected every time: a bad authority is never cached as good
        with pytest.raises(CodecError) as exc:
            RequestDecoder(Sink()).feed(b'GET / HTTP/1.1\r\nHost: a"b\r\n\r\n')
        assert exc.value.status == 400
    assert checked == ["a.b:80", 'a"b', 'a"b']

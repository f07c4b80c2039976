"""Invalid requests and responses are answered as Envoy answers them and never forwarded.

Each case is real bytes on a real socket to a sidecar in front of a real upstream; the
upstream must never see an invalid request, the client never an invalid response.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from diktyo.testing import FakeUpstream, HttpClient, http_snapshot, start_sidecar


async def _raw(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


BAD_REQUESTS = [
    # (request bytes, expected status line prefix)
    (b"GET / HTTP/1.1\r\nHost: reviews\r\nHost: evil\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET / HTTP/1.1\r\nHost: reviews\r\nhost: reviews\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET / HTTP/1.1\r\nHost: reviews\x7f\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.1 426 "),
    (b"GET / HTTP/1.0\r\nHost: reviews\r\n\r\n", b"HTTP/1.1 426 "),
    (
        (
            b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
        b"HTTP/1.1 501 ",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"HTTP/1.1 501 ",
    ),
    (b"GET / HTTP/2.0\r\nHost: reviews\r\n\r\n", b"HTTP/1.1 505 "),
]


@pytest.mark.parametrize(("data", "status"), BAD_REQUESTS)
async def test_invalid_request_is_answered_and_never_forwarded(data: bytes, status: bytes) -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        answer = await _raw(sc.port(), data)
        assert answer.startswith(status), answer
        assert b"connection: close" in answer.lower()
        assert up.requests == []


async def test_http10_accepted_only_when_enabled_and_never_without_host() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        sc.sidecar.accept_http_10 = True
        answer = await _raw(sc.port(), b"GET / HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ") and b"host" in answer
        assert up.requests == []
        answer = await _raw(sc.port(), b"GET /x HTTP/1.0\r\nHost: reviews\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert [(q.path, q.headers.get("host")) for q in up.requests] == [("/x", "reviews")]


async def test_connection_host_does_not_strip_host() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
        HttpClient(sc.port()) as c,
    ):
        r = await c.get("http://reviews/", {"Connection": "host, x-gone", "X-Gone": "1"})
        assert r.status == 200
        (q,) = up.requests
        assert q.headers.get("host") == "reviews"
        assert "x-gone" not in q.headers  # other nominated headers are still hop-by-hop


@contextlib.asynccontextmanager
async def _raw_upstream(answer: Callable[[], bytes]) -> AsyncIterator[tuple[int, list[bytes]]]:
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            got.append(await r.readuntil(b"\r\n\r\n"))
            w.write(answer())
            await w.drain()
            await asyncio.sleep(0.5)  # real time: the upstream holds the connection open
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], got
    finally:
        server.close()


BAD_RESPONSES = {
    "unasked 101": lambda: (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\nraw bytes of another protocol"
    ),
    "300 KB head": lambda: (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"x-big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(300))
        + b"content-length: 2\r\n\r\nok"
    ),
    "61 KiB head": lambda: (
        b"HTTP/1.1 200 OK\r\nx-big: " + b"v" * (61 * 1024) + b"\r\ncontent-length: 2\r\n\r\nok"
    ),
}


@pytest.mark.parametrize("case", list(BAD_RESPONSES))
async def test_invalid_upstream_response_is_502_upe(case: str) -> None:
    async with (
        _raw_upstream(BAD_RESPONSES[case]) as (port, got),
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", port)]})) as sc,
        HttpClient(sc.port()) as c,
    ):
        r = await c.get("http://reviews/")
        assert got, "the request reached the upstream"
        assert r.status == 502, (r.status, r.body[:200])
        assert r.body == (
            b"upstream connect error or disconnect/reset before headers. "
            b"reset reason: protocol error"
        )
        assert r.header("upgrade") is None
        assert not any(h.lower().startswith("x-big") for h, _ in r.headers)
        stats = sc.sidecar.stats
        assert 'response_flags="UPE"' in stats.render_prometheus({})
        assert any(v.get("upstream_rq_protocol_error") for v in stats.cluster.values()), (
            stats.cluster
        )


async def test_response_head_just_under_the_limit_passes() -> None:
    def answer() -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nx-big: " + b"v" * (50 * 1024) + b"\r\ncontent-length: 2\r\n\r\nok"
        )

    async with (
        _raw_upstream(answer) as (port, _got),
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", port)]})) as sc,
        HttpClient(sc.port()) as c,
    ):
        r = await c.get("http://reviews/")
        assert (r.status, r.body) == (200, b"ok")
        assert r.header("x-big") == "v" * (50 * 1024)

"""The connection manager over real sockets with random and mutated requests: never crashes, answers
malformed input with 4xx (or closes), and only well-formed requests reach the upstream."""

from __future__ import annotations

import asyncio
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diktyo.testing import FakeUpstream, http_request, http_snapshot, start_sidecar

VALID = (
    b"POST /p HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n\r\nhello"
    b"GET /g HTTP/1.1\r\nHost: reviews\r\n\r\n"
)


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b)) if b else 0
        if op < 0.4 and b:
            b[i] = rng.randrange(256)
        elif op < 0.7:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
        elif b:
            del b[i : i + rng.randint(1, 5)]
    return bytes(b)


async def exchange(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    try:
        await w.drain()
        w.write_eof()
    except (ConnectionError, OSError):
        pass
    out = b""
    try:
        while chunk := await asyncio.wait_for(r.read(65536), 1):
            out += chunk
    except ConnectionError:
        pass
    w.close()
    return out


async def test_mutated_requests_never_break_the_sidecar() -> None:
    rng = random.Random(1234)
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        for _ in range(60):
            out = await exchange(sc.port(), mutate(VALID, rng))
            for line in out.split(b"\r\n"):
                if line.startswith(b"HTTP/1.1 "):
                    code = int(line[9:12])
                    assert code in (200, 400, 404, 408, 411, 413, 426, 431, 501, 503, 505), out
        # every request the upstream saw was well-formed and complete
        for q in up.requests:
            assert q.method and q.path.startswith("/")
            if q.method == "POST" and "content-length" in q.headers:
                assert len(q.body) == int(q.headers["content-length"])
        # and the sidecar still works
        assert (await http_request(sc.port(), "GET", "http://reviews/ok")).status == 200


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_get_4xx_or_close(data: bytes) -> None:
    async def run() -> None:
        async with (
            FakeUpstream() as up,
            start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
        ):
            out = await exchange(sc.port(), data)
            if out.startswith(b"HTTP/1.1 "):
                assert int(out[9:12]) in (400, 404, 408, 431), out
            assert up.requests == [] or all(q.path for q in up.requests)

    asyncio.run(run())


async def test_valid_request_then_malformed_pipelined_one() -> None:
    # regression (found by the fuzz test above): the body of the first request was not flushed
    # upstream when the pipelined second one failed to parse, and the exchange hung
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        await http_request(sc.port(), "GET", "http://reviews/warm")  # a pooled connection
        out = await exchange(
            sc.port(),
            b"POST /p HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /g HT|P/1.1\r\nHost: reviews\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.1 200")
        assert up.requests[-1].body == b"hello"

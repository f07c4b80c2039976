"""The request-header timeout is absolute: counted from the head's first byte, not per byte.

A client dripping one byte every 0.3 s used to stay connected for ever (each byte reset the
timer); nginx's ``client_header_timeout`` and Envoy's ``request_headers_timeout`` end it.
"""

from __future__ import annotations

import asyncio
import sys
import time

from diktyo.testing import FakeUpstream, http_request, http_snapshot, start_sidecar_process

HEADER_TIMEOUT = 2.0


async def test_dripping_client_gets_408_at_the_header_timeout() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar_process(
            http_snapshot({"reviews": [("127.0.0.1", up.port)]}),
            "--header-timeout",
            str(HEADER_TIMEOUT),
        ) as sc,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port())
        writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Slow: ")
        await writer.drain()
        start = time.monotonic()
        answer = asyncio.ensure_future(reader.read())  # everything until the sidecar closes
        deadline = start + HEADER_TIMEOUT + 8
        while not answer.done() and time.monotonic() < deadline:
            try:
                writer.write(b"a")
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.3)  # real time: a slow client drips one byte at a time
        data = await asyncio.wait_for(answer, 5) if answer.done() else b""
        elapsed = time.monotonic() - start
        writer.close()
        assert data.startswith(b"HTTP/1.1 408 "), (data, elapsed)
        assert elapsed >= HEADER_TIMEOUT  # never before the timeout
        assert up.requests == []  # the partial head never reached the upstream
        # a prompt request on the same sidecar is unaffected
        r = await http_request(sc.port(), "GET", "http://reviews/")
        assert r.status == 200
        if not answer.done():
            answer.cancel()


async def test_header_timeout_flag_has_help() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert b"--header-timeout" in out and b"408" in out

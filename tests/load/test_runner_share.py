"""``run_load -c C -n N`` makes exactly N/C requests per connection, as fortio does, so a
connection whose requests fail fast does not take the others' share (the circuit-breaking
task's figures depend on it)."""

from __future__ import annotations

import asyncio
from collections import Counter

from diktyo.load import LoadOptions, run_load


async def test_a_fast_failing_connection_keeps_to_its_share() -> None:
    per_connection: Counter[int] = Counter()
    order: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = len(order)
        order.append(conn)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                return
            per_connection[conn] += 1
            if conn == 0:  # the first connection is served slowly with 200s
                await asyncio.sleep(0.02)  # real time: the slow connection's service time
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            else:  # the other one gets an immediate 503, like a breaker overflow
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        options = LoadOptions(url=f"http://127.0.0.1:{port}/get", connections=2, requests=20)
        result = await run_load(options, env=None)
    assert result.codes == {200: 10, 503: 10}, result.codes
    # the 200s keep their connection; like fortio, the other client opens a new connection
    # after each 503 (10 of them, one request each)
    assert sorted(per_connection.values()) == [1] * 10 + [10], per_connection
    assert result.sockets == 11

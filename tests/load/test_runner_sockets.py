"""``diktyo load`` handles its connections as fortio does: kept alive after an "ok" answer
(2xx, 418), closed after any other answer, so the next request opens a new one (fortio's
"Sockets used"). In Istio's circuit-breaking task every 503 ``UO`` therefore costs fortio a
reconnect to its sidecar, which lands on a worker anew (SO_REUSEPORT hash)."""

from __future__ import annotations

import asyncio

from diktyo.load import LoadOptions, run_load
from diktyo.load.runner import code_is_ok


async def test_a_non_ok_answer_closes_the_connection_and_the_next_request_reconnects() -> None:
    answers = iter([200, 503, 200, 200, 418, 500, 200, 201])
    requests_per_connection: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests_per_connection.append(0)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                requests_per_connection[-1] += 1
                code = next(answers)
                writer.write(f"HTTP/1.1 {code} X\r\ncontent-length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        options = LoadOptions(url=f"http://127.0.0.1:{port}/get", connections=1, requests=8)
        result = await run_load(options, env=None)
    assert result.codes == {200: 4, 201: 1, 418: 1, 500: 1, 503: 1}, result.codes
    # 200 | 503 closes | 200 200 418 500 closes | 200 201
    assert requests_per_connection == [2, 4, 2]
    assert result.sockets == 3


def test_ok_codes_are_fortios() -> None:
    assert [c for c in (199, 200, 204, 299, 300, 404, 418, 503) if code_is_ok(c)] == [
        200,
        204,
        299,
        418,
    ]

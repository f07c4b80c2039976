"""A mirror copy goes through the pooled connection's codec like any request: a shadow
upstream that breaks HTTP/1.1 costs only the copy (regression: the mirror had no handler for
an upstream protocol error, and the connection callback raised)."""

from __future__ import annotations

import asyncio
from typing import Any

from diktyo.testing import (
    FakeUpstream,
    Response,
    eventually,
    http_request,
    http_snapshot,
    outbound_cluster,
    start_sidecar,
)


async def test_a_shadow_that_breaks_http1_costs_only_the_copy() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    seen: list[bytes] = []

    async def bad_shadow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        seen.append(head)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: nope\r\n\r\n")  # nobody asked
        await w.drain()
        await asyncio.sleep(0.2)  # real time: the upstream holds the connection before closing
        w.close()

    server = await asyncio.start_server(bad_shadow, "127.0.0.1", 0)
    shadow_port = server.sockets[0].getsockname()[1]
    try:
        async with FakeUpstream(Response(body=b"main")) as main:
            mcl = outbound_cluster("mirror")
            snap = http_snapshot(
                {"reviews": [("127.0.0.1", main.port)], "mirror": [("127.0.0.1", shadow_port)]},
                routes={
                    "reviews": [
                        {
                            "name": "m",
                            "clusters": [{"cluster": outbound_cluster("reviews"), "host": "reviews"}],
                            "mirrors": [{"cluster": mcl, "host": "mirror"}],
                        }
                    ]
                },
            )
            async with start_sidecar(snap) as sc:
                for i in (1, 2):
                    r = await http_request(sc.port(), "GET", f"http://reviews:80/m{i}")
                    assert (r.status, r.body) == (200, b"main")
                    await eventually(lambda i=i: len(seen) == i)
                    # the bad answer was read: the sidecar closed that pooled connection
                    pool = sc.sidecar.pools[mcl]
                    await eventually(lambda pool=pool: not pool.active)
                assert seen[0].startswith(b"GET /m1 HTTP/1.1\r\n")
                assert b"host: reviews-shadow:80\r\n" in seen[1]
                assert errors == [], errors
    finally:
        loop.set_exception_handler(old_handler)
        server.close()
        await server.wait_closed()

"""WebSocket (HTTP/1.1 Upgrade) through a real sidecar, with the `websockets` library on both
ends: the 101 is forwarded, then raw bytes both ways until either side closes; the tunnel
survives a config push and ends after the idle timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from diktyo.testing.sidecar import start_sidecar
from diktyo.testing.snapshots import http_snapshot
from diktyo.testing.wait import eventually


async def echo(ws: ServerConnection) -> None:
    await ws.send(f"hello {ws.request.path} via {ws.request.headers.get('x-forwarded-for')}")
    async for msg in ws:
        await ws.send(msg)


@pytest.fixture
async def ws_server() -> AsyncIterator[int]:
    async with serve(echo, "127.0.0.1", 0) as server:
        yield server.sockets[0].getsockname()[1]


def snap(port: int, version: str = "1", **cluster: Any) -> Any:
    return http_snapshot(
        {"ws": [("127.0.0.1", port)]},
        clusters={"ws": cluster} if cluster else None,
        listeners=[
            {"name": "to-ws", "direction": "outbound", "port": 0, "route_table": "outbound",
             "default_host": "ws"}
        ],
        version=version,
    )  # fmt: skip


async def test_websocket_through_the_sidecar_and_across_a_config_push(ws_server: int) -> None:
    async with start_sidecar(snap(ws_server)) as sc:
        uri = f"ws://127.0.0.1:{sc.port('to-ws')}/chat"
        async with websockets.connect(uri, proxy=None) as ws:
            hello = await asyncio.wait_for(ws.recv(), 5)
            assert hello == "hello /chat via 127.0.0.1"
            for i in range(50):
                await ws.send(f"m{i}")
                assert await asyncio.wait_for(ws.recv(), 5) == f"m{i}"
            big = b"x" * 300_000
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 10) == big
            # a config push while the tunnel is open: it stays up
            sc.sidecar.apply(snap(ws_server, version="2", lb={"simple": "ROUND_ROBIN"}))
            await asyncio.sleep(0.2)  # real time: the push's follow-up work runs; the tunnel stays
            await ws.send("after push")
            assert await asyncio.wait_for(ws.recv(), 5) == "after push"
        # the client closed: the sidecar lets go of both sides
        await eventually(lambda: not any(c.connections for c in sc.sidecar.listeners.values()))


async def test_websocket_tunnel_ends_after_the_idle_timeout(ws_server: int) -> None:
    async with start_sidecar(snap(ws_server, pool={"idle_timeout": 1.0})) as sc:
        uri = f"ws://127.0.0.1:{sc.port('to-ws')}/idle"
        async with websockets.connect(uri, proxy=None, ping_interval=None) as ws:
            await asyncio.wait_for(ws.recv(), 5)
            await ws.send("still here")
            assert await asyncio.wait_for(ws.recv(), 5) == "still here"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)  # nothing sent: idle 1 s -> closed
        assert sc.sidecar.stats.server.get("downstream_cx_idle_timeout", 0) == 1


async def test_plain_requests_still_refuse_other_upgrades(ws_server: int) -> None:
    """Only ``Upgrade: websocket`` is tunnelled; an h2c upgrade is answered as a plain request."""
    async with start_sidecar(snap(ws_server)) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.port("to-ws"))
        w.write(b"GET / HTTP/1.1\r\nhost: ws\r\nconnection: upgrade, http2-settings\r\n"
                b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n")  # fmt: skip
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 5)
        w.close()
        assert not line.startswith(b"HTTP/1.1 101")


async def test_upgrade_to_an_http2_only_route_is_refused(ws_server: int) -> None:
    """A route whose cluster speaks HTTP/2 upstream cannot carry an HTTP/1.1 upgrade: 403."""
    async with start_sidecar(snap(ws_server, upstream_protocol="HTTP/2")) as sc:
        uri = f"ws://127.0.0.1:{sc.port('to-ws')}/x"
        with pytest.raises(websockets.InvalidStatus) as err:
            async with websockets.connect(uri, proxy=None):
                pass
        resp = err.value.response
        assert resp.status_code == 403
        assert b"websocket upgrade refused" in resp.body and b"HTTP/2" in resp.body

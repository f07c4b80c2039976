"""TCP services get auto mTLS too: client TCP proxy -> server sidecar's inbound TCP listener (STRICT)."""

from __future__ import annotations

import asyncio

import msgspec

from diktyo.control.server import ControlPlane
from diktyo.proxy.main import start_identity
from diktyo.proxy.sidecar import Sidecar
from diktyo.snapshot.security import PeerAuthn, SecurityConfig
from diktyo.testing import http_snapshot

SERVER_ID = "spiffe://cluster.local/ns/default/sa/db"


async def _echo() -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(100)
        w.write(b"echo:" + data)
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _talk(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(100), 5)
    except ConnectionResetError:  # closed with our bytes unread: RST
        return b""
    finally:
        w.close()


async def test_tcp_through_two_sidecars_is_mtls_and_strict_refuses_plaintext() -> None:
    cp = ControlPlane(observability=False)
    url = await cp.start()
    loop = asyncio.get_running_loop()
    server_sc, client_sc = Sidecar(loop), Sidecar(loop)
    app, app_port = await _echo()
    try:
        assert (
            await start_identity(server_sc, url, cp.identity.token_for("default", "db"), 10) == ""
        )
        assert (
            await start_identity(client_sc, url, cp.identity.token_for("default", "app"), 10) == ""
        )
        server_snap = http_snapshot(
            {},
            extra_clusters=[
                {"name": "inbound|9000||", "endpoints": [{"address": "127.0.0.1", "port": app_port}]}
            ],
            listeners=[
                {"name": "inbound|9000", "direction": "tcp", "port": 0,
                 "cluster": "inbound|9000||", "service_port": 9000}
            ],
        )  # fmt: skip
        server_snap = msgspec.structs.replace(
            server_snap, security=SecurityConfig(peer_authn=PeerAuthn(mode="STRICT"))
        )
        server_sc.apply(server_snap)
        await server_sc.wait_listening()
        inbound = server_sc.ports()["inbound|9000"]

        # a client without a sidecar: refused (STRICT)
        assert await _talk(inbound, b"hi") == b""

        client_sc.apply(
            http_snapshot(
                {},
                extra_clusters=[
                    {"name": "outbound|9000||db", "service": "db", "port": 9000,
                     "endpoints": [{"address": "127.0.0.1", "port": inbound,
                                    "has_sidecar": True, "principal": SERVER_ID}]}
                ],
                listeners=[
                    {"name": "outbound|db:9000", "direction": "tcp", "port": 0,
                     "cluster": "outbound|9000||db", "service_port": 9000}
                ],
            )
        )  # fmt: skip
        await client_sc.wait_listening()
        assert await _talk(client_sc.ports()["outbound|db:9000"], b"hi") == b"echo:hi"
        assert server_sc.stats.server.get("downstream_cx_refused_peer_authn") == 1
    finally:
        await client_sc.stop()
        await server_sc.stop()
        app.close()
        await cp.stop()

"""ALPN between sidecars: an inbound listener offers HTTP/2 first, so an HTTP/2 pool gets
``istio-h2``, an HTTP/1.1 sidecar still gets ``istio-http/1.1`` and a plain client ``h2``."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from diktyo.control.ca import CertificateAuthority
from diktyo.proxy.network.h2pool import H2_ALPN
from diktyo.proxy.network.tls import (
    INBOUND_ALPN,
    MESH_ALPN,
    CertificateStore,
    client_context,
)

TD = "cluster.local"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(trust_domain=TD)


def creds(ca: CertificateAuthority, sa: str) -> tuple[str, str, str]:
    key, issued = ca.issue(f"spiffe://{TD}/ns/default/sa/{sa}")
    return issued.cert_chain_pem, key, ca.trust_bundle_pem()


async def negotiated(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str | None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(1)
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client_ctx), 5)
        proto = w.get_extra_info("ssl_object").selected_alpn_protocol()
        w.close()
        return proto
    finally:
        server.close()
        await server.wait_closed()


async def test_inbound_alpn_prefers_http2_when_offered(ca: CertificateAuthority) -> None:
    store = CertificateStore()
    store.update(*creds(ca, "ratings"))
    server_ctx = store.server_context(require_client_cert=True, alpn=INBOUND_ALPN)
    assert store.server_context(True, INBOUND_ALPN) is server_ctx  # cached per ALPN list
    h2_client = client_context(*creds(ca, "sleep"), alpn=H2_ALPN)
    h1_client = client_context(*creds(ca, "sleep"), alpn=MESH_ALPN)
    plain_h2 = client_context(*creds(ca, "sleep"), alpn=("h2", "http/1.1"))
    assert await negotiated(server_ctx, h2_client) == "istio-h2"
    assert await negotiated(server_ctx, h1_client) == "istio-http/1.1"
    assert await negotiated(server_ctx, plain_h2) == "h2"
    # the HTTP/2 pool's ISTIO_MUTUAL context offers the h2 names
    store_client = store.client_context(H2_ALPN)
    assert store.client_context(H2_ALPN) is store_client
    assert await negotiated(server_ctx, store_client) == "istio-h2"

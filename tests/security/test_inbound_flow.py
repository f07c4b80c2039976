"""The whole inbound path over real sockets: STRICT mTLS accept -> InboundSecurity -> reply.

A reference for wiring the sidecar's inbound listener: ``accept_inbound`` applies the
PeerAuthentication mode and terminates mTLS, the peer's SPIFFE id goes into
``InboundSecurity.check`` together with the request head.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from diktyo.control.ca import CertificateAuthority
from diktyo.proxy.filters.authz import InboundSecurity
from diktyo.proxy.network.tls import (
    CertificateStore,
    InboundRefused,
    accept_inbound,
    client_context,
    peer_certificate_der,
    peer_spiffe_id,
)
from diktyo.security.translate import build_security
from diktyo.snapshot.model import Node
from diktyo.testing import eventually

REVIEWS = Node(
    id="reviews-1.default",
    workload="reviews-v1",
    labels={"app": "reviews"},
    service_account="reviews",
)
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
RATINGS = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"


class R:
    def __init__(self, kind: str, name: str, namespace: str, spec: dict) -> None:
        self.kind, self.name, self.namespace, self.spec = kind, name, namespace, spec


RESOURCES = [
    R("PeerAuthentication", "default", "istio-system", {"mtls": {"mode": "STRICT"}}),
    R("AuthorizationPolicy", "allow-nothing", "default", {}),
    R(
        "AuthorizationPolicy",
        "reviews-viewer",
        "default",
        {
            "selector": {"matchLabels": {"app": "reviews"}},
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["cluster.local/ns/default/sa/bookinfo-productpage"]
                            }
                        }
                    ],
                    "to": [{"operation": {"methods": ["GET"]}}],
                }
            ],
        },
    ),
]


class Inbound(asyncio.Protocol):
    """Toy HTTP/1.0 handler: one request per connection (the real one is the proxy's codec)."""

    def __init__(self, security: InboundSecurity) -> None:
        self.security = security
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        sslobj = transport.get_extra_info("ssl_object")
        self.peer = peer_spiffe_id(sslobj) or ""
        self.der = peer_certificate_der(sslobj)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head = self.buf.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        v = self.security.check(
            method, target, headers.get("host", ""), headers, 9080, self.peer, "127.0.0.1", self.der
        )
        assert v is not None
        status, body = (
            (200, f"ok {v.path} {dict(v.set_headers).get('x-forwarded-client-cert', '')}".encode())
            if v.status == 0
            else (v.status, v.body)
        )
        self.t.write(b"HTTP/1.0 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body))  # type: ignore[attr-defined]
        self.t.close()


async def test_strict_inbound_flow() -> None:
    ca = CertificateAuthority.generate()
    sec = build_security(REVIEWS, RESOURCES)
    assert sec.peer_authn.mode == "STRICT"
    me = f"spiffe://cluster.local/ns/default/sa/{REVIEWS.service_account}"
    store = CertificateStore()
    key, issued = ca.issue(me)
    store.update(issued.cert_chain_pem, key, issued.trust_bundle_pem)
    security = InboundSecurity(sec, local_spiffe_id=me)
    loop = asyncio.get_running_loop()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    ls.setblocking(False)
    port = ls.getsockname()[1]
    refusals: list[str] = []

    async def serve() -> None:
        while True:
            s, _ = await loop.sock_accept(ls)
            try:
                await accept_inbound(
                    loop, s, lambda: Inbound(security), sec.peer_authn.mode_for(9080), store, 5
                )
            except InboundRefused as exc:
                refusals.append(str(exc))

    async def get(
        ctx: ssl.SSLContext | None, method: str = "GET", path: str = "/reviews/0"
    ) -> bytes:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
        w.write(f"{method} {path} HTTP/1.0\r\nHost: reviews:9080\r\n\r\n".encode())
        await w.drain()
        data = await asyncio.wait_for(r.read(), 5)
        w.close()
        return data

    def client(sid: str) -> ssl.SSLContext:
        k, i = ca.issue(sid)
        return client_context(i.cert_chain_pem, k, i.trust_bundle_pem)

    server = asyncio.create_task(serve())
    try:
        ok = await get(client(PRODUCTPAGE), path="/reviews/./0")
        assert ok.startswith(b"HTTP/1.0 200")
        assert b"ok /reviews/0 By=" + me.encode() in ok and b"URI=" + PRODUCTPAGE.encode() in ok
        denied = await get(client(RATINGS))
        assert denied.startswith(b"HTTP/1.0 403") and denied.endswith(b"RBAC: access denied")
        assert (await get(client(PRODUCTPAGE), method="POST")).startswith(b"HTTP/1.0 403")
        plain = b""
        try:
            plain = await get(None)
        except ConnectionError:
            pass
        assert plain == b""
        # the server records the refusal right after closing
        await eventually(lambda: refusals, timeout=10, what="the refusal recorded")
        assert refusals == ["plaintext connection refused: PeerAuthentication mode is STRICT"]
    finally:
        server.cancel()
        ls.close()

"""Decrypted reads of mesh TLS connections: at most one record per ``SSLObject.read``.

uvloop's and the stdlib's SSL protocols call ``SSLObject.read(256 KiB)``; CPython allocates
the whole size before shrinking it, which glibc serves with mmap/mremap/munmap for every small
request or response. The sidecar's contexts hand out ``RecordSizedSSLObject``s that ask for one
record (16 KiB) at a time. What must hold: a read of a small record no longer allocates the
256 KiB, and data of any size still arrives whole and in order, through the sidecar's own
``open_upstream`` and ``accept_inbound`` on uvloop and asyncio.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tracemalloc
from typing import Any

import pytest
import uvloop

from diktyo.control.ca import CertificateAuthority
from diktyo.proxy.network.tls import (
    TLS_MAX_PLAINTEXT,
    CertificateStore,
    RecordSizedSSLObject,
    accept_inbound,
)
from diktyo.proxy.network.upstream import open_upstream
from diktyo.snapshot.model import Endpoint

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/reviews"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/productpage"
ASYNCIO_READ = 256 * 1024  # what uvloop's and asyncio's SSL protocols ask for


@pytest.fixture(scope="module")
def stores() -> tuple[CertificateStore, CertificateStore]:
    ca = CertificateAuthority.generate(trust_domain=TD)
    out = []
    for sid in (SERVER_ID, CLIENT_ID):
        s = CertificateStore()
        key, issued = ca.issue(sid, None)
        s.update(issued.cert_chain_pem, key, ca.trust_bundle_pem())
        out.append(s)
    return out[0], out[1]


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def _handshake(server: CertificateStore, client: CertificateStore) -> tuple[Any, Any, Any]:
    """A client and a server ``SSLObject`` of the sidecar's contexts, handshake done in memory."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.server_context().wrap_bio(s_in, s_out, server_side=True)
    cli = client.client_context().wrap_bio(c_in, c_out, server_side=False)
    for _ in range(10):
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        _pump(s_out, c_in)
    assert srv.version() == "TLSv1.3" and cli.version() == "TLSv1.3"
    return srv, cli, (s_in, c_out)


def test_the_sidecars_contexts_make_record_sized_objects(
    stores: tuple[CertificateStore, CertificateStore],
) -> None:
    srv, cli, _ = _handshake(*stores)
    assert isinstance(srv, RecordSizedSSLObject) and isinstance(cli, RecordSizedSSLObject)
    # the server context is still a plain SSLContext (its session cache cap needs that type)
    assert type(stores[0].server_context()) is ssl.SSLContext


def test_a_small_record_is_read_without_the_256k_allocation(
    stores: tuple[CertificateStore, CertificateStore],
) -> None:
    srv, cli, (s_in, c_out) = _handshake(*stores)
    request = b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"
    for _ in range(3):  # warm: the first read may allocate OpenSSL's own buffers
        cli.write(request)
        _pump(c_out, s_in)
        assert srv.read(ASYNCIO_READ) == request
    cli.write(request)
    _pump(c_out, s_in)
    tracemalloc.start()
    try:
        got = srv.read(ASYNCIO_READ)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == request
    assert peak < 2 * TLS_MAX_PLAINTEXT, f"reading {len(request)} bytes allocated {peak} bytes"


def test_data_larger_than_a_record_comes_in_record_sized_reads(
    stores: tuple[CertificateStore, CertificateStore],
) -> None:
    srv, cli, (s_in, c_out) = _handshake(*stores)
    body = bytes(range(256)) * 400  # 100 KiB: seven records
    cli.write(body)
    _pump(c_out, s_in)
    chunks = []
    while True:
        try:
            chunk = srv.read(ASYNCIO_READ)
        except ssl.SSLWantReadError:
            break
        assert 0 < len(chunk) <= TLS_MAX_PLAINTEXT
        chunks.append(chunk)
    assert b"".join(chunks) == body
    buf = bytearray(64)  # reads into a caller's buffer are untouched
    cli.write(b"x" * 10)
    _pump(c_out, s_in)
    assert srv.read(64, buf) == 10 and bytes(buf[:10]) == b"x" * 10


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)


class _Collect(asyncio.Protocol):
    def __init__(self, want: int) -> None:
        self.want = want
        self.buf = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.buf))


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_echo_of_small_and_large_messages_through_the_sidecars_tls(
    stores: tuple[CertificateStore, CertificateStore], loop_kind: str
) -> None:
    server, client = stores

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        accepted: list[asyncio.Task[Any]] = []

        async def serve() -> None:
            while True:
                s, _ = await loop.sock_accept(lsock)
                accepted.append(
                    loop.create_task(accept_inbound(loop, s, _Echo, "STRICT", server, 5))
                )

        server_task = loop.create_task(serve())
        ep = Endpoint(address="127.0.0.1", port=port, principal=SERVER_ID, has_sidecar=True)
        try:
            for size in (300, 5 * TLS_MAX_PLAINTEXT + 123, 1024 * 1024):
                payload = bytes((i * 7) & 0xFF for i in range(size))
                t, p = await open_upstream(
                    loop, "127.0.0.1", port, None, lambda n=size: _Collect(n), ep, client
                )
                assert isinstance(t.get_extra_info("ssl_object"), RecordSizedSSLObject)
                t.write(payload)
                got = await asyncio.wait_for(p.done, 10)  # type: ignore[attr-defined]
                assert got == payload, size
                t.close()
        finally:
            server_task.cancel()
            for task in accepted:
                if task.done() and not task.cancelled() and task.exception() is None:
                    task.result()[0].close()
            lsock.close()

    if loop_kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())

"""diktyo's own mTLS record layer (``tlsrecord.TlsTransport``): TLS on a plain TCP transport.

Two kinds of tests:

- over real sockets on 127.0.0.1 through the sidecar's ``open_upstream`` (client) and
  ``accept_inbound`` (server), on uvloop: large bodies, write flow control with a slow reader,
  close_notify, identity after resumption, the handshake timeout;
- byte-exact cases that a socket cannot produce on demand (a record split over many reads,
  several records in one read with the application pausing, a close_notify behind data): the
  layer's TCP transport is then a recording stand-in, its TLS peer a real ``ssl.SSLObject``
  on memory BIOs with the sidecar's own contexts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest
import uvloop

from diktyo.control.ca import CertificateAuthority
from diktyo.proxy.network.tls import (
    CertificateStore,
    InboundRefused,
    accept_inbound,
    peer_spiffe_id,
)
from diktyo.proxy.network.tlsrecord import TlsTransport, new_tls
from diktyo.proxy.network.upstream import open_upstream
from diktyo.snapshot.model import Endpoint
from diktyo.testing.wait import eventually

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/reviews"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/productpage"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(trust_domain=TD)


def store_for(ca: CertificateAuthority, sid: str) -> CertificateStore:
    s = CertificateStore()
    key, issued = ca.issue(sid, None)
    s.update(issued.cert_chain_pem, key, ca.trust_bundle_pem())
    return s


class App(asyncio.Protocol):
    """Records what the layer hands it; ``pause_after`` pauses reading after that many calls."""

    def __init__(self, pause_after: int = 0) -> None:
        self.t: Any = None
        self.chunks: list[bytes] = []
        self.events: list[str] = []
        self.pause_after = pause_after
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.pause_after and len(self.chunks) == self.pause_after:
            self.t.pause_reading()

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")


# ------------------------------------------------------------------ in memory, byte-exact


class Wire:
    """The TCP transport under the layer: records what the layer writes and asks for."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Peer:
    """A real TLS client (``ssl.SSLObject`` on memory BIOs, the sidecar's client context)."""

    def __init__(self, store: CertificateStore) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = store.client_context().wrap_bio(self.inc, self.out, server_hostname=None)

    def handshake(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.out.read()

    def receive(self, wire: bytes) -> bytes:
        self.inc.write(wire)
        got = b""
        try:
            while True:
                chunk = self.obj.read(65536)
                if not chunk:
                    break
                got += chunk
        except ssl.SSLWantReadError:
            pass
        return got


async def _open_in_memory(
    ca: CertificateAuthority, app: App, step: int = 0
) -> tuple[TlsTransport, Wire, Peer]:
    """A server-side layer and a client peer after the handshake; ``step`` > 0 feeds the
    layer the client's bytes ``step`` bytes per ``data_received``."""
    loop = asyncio.get_running_loop()
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)
    ctx = server.server_context(require_client_cert=True)
    layer, waiter = new_tls(loop, ctx, app, True)
    wire = Wire()
    layer.connection_made(wire)  # type: ignore[arg-type]  # the stand-in TCP transport
    peer = Peer(client)

    def feed(data: bytes) -> None:
        if step <= 0:
            layer.data_received(data)
            return
        for i in range(0, len(data), step):
            layer.data_received(data[i : i + step])

    for _ in range(10):
        done = peer.handshake()
        feed(peer.out.read())
        peer.receive(wire.take())
        if done and waiter.done():
            break
    await waiter
    # the layer's post-handshake step (its ticket) was scheduled with call_soon when the
    # waiter resolved; a callback scheduled now runs after it (the loop's ready queue is FIFO)
    step = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(step.set_result, None)
    await step
    peer.receive(wire.take())
    return layer, wire, peer


def test_record_split_across_reads_is_delivered_whole(ca: CertificateAuthority) -> None:
    async def main() -> None:
        app = App()
        layer, wire, peer = await _open_in_memory(ca, app, step=1)  # handshake byte by byte
        assert app.events == ["made"]
        msg = b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n"
        record = peer.send(msg)
        for i in range(len(record) - 1):  # every byte but the last: nothing to deliver yet
            layer.data_received(record[i : i + 1])
        assert app.chunks == []
        layer.data_received(record[-1:])
        assert app.chunks == [msg]
        # a record and a half, then the other half
        two = peer.send(b"a" * 100) + peer.send(b"b" * 100)
        layer.data_received(two[:-10])
        assert app.chunks[1:] == [b"a" * 100]
        layer.data_received(two[-10:])
        assert app.chunks[1:] == [b"a" * 100, b"b" * 100]
        # and the reply goes out as records the peer decrypts
        layer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert peer.receive(wire.take()) == b"HTTP/1.1 200 OK\r\n\r\n"

    uvloop.run(main())


def test_several_records_in_one_read_and_a_pause_in_between(ca: CertificateAuthority) -> None:
    async def main() -> None:
        app = App(pause_after=1)
        layer, wire, peer = await _open_in_memory(ca, app)
        burst = peer.send(b"one") + peer.send(b"two") + peer.send(b"three")
        layer.data_received(burst)
        assert app.chunks == [b"one"]  # paused after the first record: the rest waits
        assert not wire.reading  # and TCP reading is paused too
        layer.data_received(b"")  # (nothing new: still paused)
        assert app.chunks == [b"one"]
        app.pause_after = 0
        layer.resume_reading()
        assert wire.reading
        await eventually(lambda: app.chunks == [b"one", b"two", b"three"])

    uvloop.run(main())


def test_close_notify_behind_data_reaches_the_application_and_is_answered(
    ca: CertificateAuthority,
) -> None:
    async def main() -> None:
        app = App()
        layer, wire, peer = await _open_in_memory(ca, app)
        data = peer.send(b"last words")
        try:
            peer.obj.unwrap()  # the client's close_notify
        except ssl.SSLWantReadError:
            pass
        layer.data_received(data + peer.out.read())  # data and close_notify in one read
        assert app.chunks == [b"last words"]
        assert app.events == ["made", "eof"]
        assert wire.closed and not wire.aborted  # a graceful close, after ...
        peer.inc.write(wire.take())
        peer.obj.unwrap()  # ... our close_notify: the client's shutdown completes
        assert layer.is_closing()
        layer.write(b"too late")  # dropped, as asyncio transports drop writes after close
        assert wire.take() == b""
        layer.connection_lost(None)
        assert app.events == ["made", "eof", "lost"]

    uvloop.run(main())


def test_truncation_without_close_notify_is_no_eof(ca: CertificateAuthority) -> None:
    async def main() -> None:
        app = App()
        layer, wire, peer = await _open_in_memory(ca, app)
        assert layer.eof_received() is False  # TCP closes; as uvloop's SSL: no eof_received
        layer.connection_lost(None)
        assert app.events == ["made", "lost"]

    uvloop.run(main())


def test_close_sends_close_notify_once_and_keeps_the_written_data(
    ca: CertificateAuthority,
) -> None:
    async def main() -> None:
        app = App()
        layer, wire, peer = await _open_in_memory(ca, app)
        layer.write(b"response body")
        layer.close()
        layer.close()
        assert wire.closed and not wire.aborted
        peer.inc.write(wire.take())
        assert peer.obj.read(100) == b"response body"
        assert peer.obj.read(100) == b""  # close_notify
        assert peer.obj.get_channel_binding() is not None  # (the connection stayed sane)

    uvloop.run(main())


# ------------------------------------------------------------------ real sockets


class Inbound:
    """A listener terminating mTLS with ``accept_inbound``; ``make`` builds each protocol."""

    def __init__(self, store: CertificateStore, make: Any, handshake_timeout: float = 5) -> None:
        self.store = store
        self.make = make
        self.timeout = handshake_timeout
        self.protocols: list[Any] = []
        self.refusals: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.task: asyncio.Task[None] | None = None

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            s, _ = await loop.sock_accept(self.sock)
            try:
                _, proto, _ = await accept_inbound(
                    loop, s, self.make, "STRICT", self.store, self.timeout
                )
            except InboundRefused as exc:
                self.refusals.append(str(exc))
                continue
            self.protocols.append(proto)

    def __enter__(self) -> Inbound:
        self.task = asyncio.get_running_loop().create_task(self._serve())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        self.sock.close()


class Echo(App):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.t.write(data)


async def _connect(port: int, client: CertificateStore, make: Any = App) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    ep = Endpoint(address="127.0.0.1", port=port, principal=SERVER_ID, has_sidecar=True)
    return await asyncio.wait_for(
        open_upstream(loop, "127.0.0.1", port, None, make, ep, client), 5
    )


def test_large_body_spans_many_records_both_ways(ca: CertificateAuthority) -> None:
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)
    body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: 65 records and a bit

    async def main() -> None:
        with Inbound(server, Echo) as srv:
            t, p = await _connect(srv.port, client)
            assert isinstance(t, TlsTransport)  # the record layer, not uvloop's SSL transport
            t.write(body)
            await eventually(lambda: sum(map(len, p.chunks)) >= len(body), timeout=10)
            assert b"".join(p.chunks) == body
            assert max(map(len, p.chunks)) <= 16384  # one record's plaintext per call
            assert len(p.chunks) >= len(body) // 16384
            t.close()
            await asyncio.wait_for(p.lost, 5)

    uvloop.run(main())


class Flood(App):
    """Writes ``total`` bytes as soon as it is connected, honouring pause/resume_writing."""

    total = 8 * 1024 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sent = 0
        self.paused = False
        self.pump()

    def pump(self) -> None:
        while self.sent < self.total and not self.paused:
            n = min(65536, self.total - self.sent)
            self.t.write(b"x" * n)
            self.sent += n

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self.paused = False
        self.pump()


def test_slow_reader_pauses_and_resumes_the_writer(ca: CertificateAuthority) -> None:
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        with Inbound(server, Flood) as srv:
            t, p = await _connect(srv.port, client)
            t.pause_reading()
            assert not t.is_reading()
            await eventually(lambda: bool(srv.protocols) and srv.protocols[0].paused)
            flood = srv.protocols[0]
            assert flood.events[-1] == "pause_writing"
            assert flood.sent < Flood.total  # held back, not buffered without bound
            assert flood.t.get_write_buffer_size() > 0
            t.resume_reading()
            await eventually(lambda: sum(map(len, p.chunks)) >= Flood.total, timeout=20)
            assert b"".join(p.chunks) == b"x" * Flood.total
            assert "resume_writing" in flood.events
            t.close()

    uvloop.run(main())


def test_close_notify_over_a_socket_and_identity_after_resumption(
    ca: CertificateAuthority,
) -> None:
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        with Inbound(server, Echo) as srv:
            seen = []
            for _ in range(3):
                t, p = await _connect(srv.port, client)
                t.write(b"ping")
                await eventually(lambda: b"".join(p.chunks) == b"ping")  # noqa: B023
                so = t.get_extra_info("ssl_object")
                cert = t.get_extra_info("peercert")  # decoded on demand
                uris = [v for k, v in cert["subjectAltName"] if k == "URI"]
                seen.append((so.session_reused, peer_spiffe_id(so), uris))
                t.close()  # close_notify: the server's protocol sees an EOF, then the end
                await asyncio.wait_for(p.lost, 5)
                inbound = srv.protocols[-1]
                await asyncio.wait_for(inbound.lost, 5)
                assert inbound.events == ["made", "eof", "lost"]
                sso = inbound.t.get_extra_info("ssl_object")
                assert peer_spiffe_id(sso) == CLIENT_ID
                assert sso.session_reused == so.session_reused
            assert seen == [
                (False, SERVER_ID, [SERVER_ID]),
                (True, SERVER_ID, [SERVER_ID]),  # resumed: same identity, no certificate sent
                (True, SERVER_ID, [SERVER_ID]),
            ]
            assert server.inbound_stats == {"ssl_handshake": 3, "ssl_session_reused": 2}

    uvloop.run(main())


def test_handshake_timeout_refuses_a_silent_client(ca: CertificateAuthority) -> None:
    server = store_for(ca, SERVER_ID)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with Inbound(server, App, handshake_timeout=0.3) as srv:
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", srv.port))
            await loop.sock_sendall(s, b"\x16")  # looks like TLS, then nothing
            await eventually(lambda: bool(srv.refusals), timeout=5)
            assert "SSL handshake is taking longer than 0.3 seconds" in srv.refusals[0]
            assert await asyncio.wait_for(loop.sock_recv(s, 10), 5) == b""  # closed
            s.close()

    uvloop.run(main())


def test_refused_client_certificate_gets_the_alert(ca: CertificateAuthority) -> None:
    """STRICT and a TLS 1.3 client without a certificate: the server's ``certificate
    required`` alert reaches the client (uvloop's SSL transport closed without sending it)."""
    server = store_for(ca, SERVER_ID)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with Inbound(server, App) as srv:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=ca.trust_bundle_pem())
            ctx.check_hostname = False
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=ctx)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")  # TLS 1.3: the client's handshake is over
            with pytest.raises(ssl.SSLError) as err:
                await asyncio.wait_for(reader.read(100), 5)
            assert err.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
            writer.close()
            await eventually(lambda: bool(srv.refusals))
            assert "client presented no certificate" in srv.refusals[0]
            del loop

    uvloop.run(main())


class Switch(App):
    """Hands the transport to a new protocol on its first bytes, as the sidecar's
    ``DownstreamSniffer`` does (``set_protocol`` inside ``data_received``)."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.next = App()
        self.t.set_protocol(self.next)
        self.next.connection_made(self.t)
        self.next.data_received(data)


def test_protocol_switched_in_the_first_record_gets_the_following_ones(
    ca: CertificateAuthority,
) -> None:
    async def main() -> None:
        app = Switch()
        layer, wire, peer = await _open_in_memory(ca, app)
        body = b"POST / HTTP/1.1\r\n\r\n" + b"b" * 50000  # 4 records in one TCP read
        layer.data_received(peer.send(body))
        assert len(app.chunks) == 1  # the sniffer saw the first record only
        assert b"".join(app.next.chunks) == body
        assert layer.get_protocol() is app.next

    uvloop.run(main())


def test_a_lost_connection_is_freed_without_the_cycle_collector(ca: CertificateAuthority) -> None:
    import gc
    import weakref

    async def main() -> None:
        app = App()
        layer, wire, peer = await _open_in_memory(ca, app)
        ref = weakref.ref(app)
        layer.connection_lost(None)
        assert layer.get_protocol() is None
        del app
        gc.disable()  # only reference counting: the protocol (which holds the layer) goes now
        try:
            assert ref() is None
        finally:
            gc.enable()

    uvloop.run(main())

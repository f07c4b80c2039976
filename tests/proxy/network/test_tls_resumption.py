"""TLS 1.3 session resumption between mesh peers: real handshakes over 127.0.0.1 through the
sidecar's own ``open_upstream`` (client) and ``accept_inbound`` (server), on uvloop and asyncio.

What must hold: a second connection to the same upstream resumes (both sides see
``session_reused``) and still yields the right peer SPIFFE ids; a certificate or trust-bundle
rotation on either side means a full handshake, never a resumed session of the old identity;
a session is only offered to the upstream (address, SNI, expected identity) it came from.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from diktyo.control.ca import CertificateAuthority
from diktyo.proxy.network.tls import (
    SESSION_EXPIRY_MARGIN,
    CertificateStore,
    InboundRefused,
    ResumingClientContext,
    SessionCache,
    accept_inbound,
    peer_spiffe_id,
    upstream_context,
)
from diktyo.proxy.network.upstream import AUTO_MTLS, open_upstream
from diktyo.snapshot.model import Endpoint, TlsSettings
from diktyo.testing.wait import eventually, eventually_sync

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/reviews"
OTHER_SERVER_ID = f"spiffe://{TD}/ns/default/sa/ratings"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/productpage"


def store_for(ca: CertificateAuthority, sid: str) -> CertificateStore:
    s = CertificateStore()
    rotate(s, ca, sid)
    return s


def rotate(store: CertificateStore, ca: CertificateAuthority, sid: str, bundle: str = "") -> None:
    key, issued = ca.issue(sid, None)
    store.update(issued.cert_chain_pem, key, bundle or ca.trust_bundle_pem())


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        so = transport.get_extra_info("ssl_object")
        self.peer = peer_spiffe_id(so)
        self.reused = bool(so is not None and so.session_reused)

    def data_received(self, data: bytes) -> None:
        self.t.write(b"echo:" + data)


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport

    def data_received(self, data: bytes) -> None:
        if not self.got.done():
            self.got.set_result(data)


class InboundServer:
    """A listener that terminates mTLS with ``accept_inbound`` and records each peer."""

    def __init__(self, store: CertificateStore) -> None:
        self.store = store
        self.seen: list[tuple[str | None, bool]] = []  # (peer SPIFFE id, resumed)
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
                _, proto, _ = await accept_inbound(loop, s, Echo, "STRICT", self.store, 5)
            except InboundRefused as exc:
                self.refusals.append(str(exc))
                continue
            self.seen.append((proto.peer, proto.reused))  # type: ignore[attr-defined]

    def __enter__(self) -> InboundServer:
        self.task = asyncio.get_running_loop().create_task(self._serve())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        self.sock.close()


async def request(
    port: int, client: CertificateStore, principal: str = SERVER_ID, tls: TlsSettings | None = None
) -> tuple[bytes, bool, str | None]:
    """One connection through ``open_upstream``: (reply, resumed, server's SPIFFE id)."""
    loop = asyncio.get_running_loop()
    ep = Endpoint(address="127.0.0.1", port=port, principal=principal, has_sidecar=True)
    t, p = await asyncio.wait_for(
        open_upstream(loop, "127.0.0.1", port, tls, Client, ep, client), 5
    )
    t.write(b"hi")
    reply = await asyncio.wait_for(p.got, 5)  # type: ignore[attr-defined]
    so = t.get_extra_info("ssl_object")
    t.close()
    return reply, bool(so.session_reused), peer_spiffe_id(so)


def on_both_loops(fn: Callable[[], Awaitable[None]], loop_kind: str) -> None:
    (uvloop.run if loop_kind == "uvloop" else asyncio.run)(fn())


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(trust_domain=TD)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_second_connection_resumes_with_the_same_identities(
    ca: CertificateAuthority, loop_kind: str
) -> None:
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        with InboundServer(server) as srv:
            first = await request(srv.port, client)
            later = [await request(srv.port, client) for _ in range(3)]
        assert first == (b"echo:hi", False, SERVER_ID)
        # resumed: no certificates were sent, yet each side still knows the other's identity
        assert later == [(b"echo:hi", True, SERVER_ID)] * 3
        assert srv.seen == [(CLIENT_ID, False)] + [(CLIENT_ID, True)] * 3
        assert server.inbound_stats == {"ssl_handshake": 4, "ssl_session_reused": 3}

    on_both_loops(main, loop_kind)


def test_rotation_on_either_side_means_a_full_handshake(ca: CertificateAuthority) -> None:
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        with InboundServer(server) as srv:
            assert (await request(srv.port, client))[1] is False
            assert (await request(srv.port, client))[1] is True
            rotate(client, ca, CLIENT_ID)  # our certificate renewed: new context, empty cache
            assert (await request(srv.port, client))[1] is False
            assert (await request(srv.port, client))[1] is True
            rotate(server, ca, SERVER_ID)  # the server's renewed: its old tickets are refused
            assert (await request(srv.port, client))[1] is False
            assert (await request(srv.port, client))[1] is True
        assert [r for _, r in srv.seen] == [False, True] * 3

    uvloop.run(main())


def test_new_identity_or_trust_bundle_is_never_resumed_into_the_old_one(
    ca: CertificateAuthority,
) -> None:
    other_ca = CertificateAuthority.generate(trust_domain=TD)
    both = ca.trust_bundle_pem() + other_ca.trust_bundle_pem()
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        with InboundServer(server) as srv:
            await request(srv.port, client)
            assert (await request(srv.port, client))[1] is True
            # the workload behind the address is now another service account: the client
            # holds a session of `reviews`, and the server's new context cannot resume it
            rotate(server, ca, OTHER_SERVER_ID)
            reply, resumed, peer = await request(srv.port, client, principal=OTHER_SERVER_ID)
            assert (reply, resumed, peer) == (b"echo:hi", False, OTHER_SERVER_ID)
            # trust bundle change (a second root added, CA migration) on both sides
            rotate(server, other_ca, OTHER_SERVER_ID, bundle=both)
            rotate(client, ca, CLIENT_ID, bundle=both)
            reply, resumed, peer = await request(srv.port, client, principal=OTHER_SERVER_ID)
            assert (reply, resumed, peer) == (b"echo:hi", False, OTHER_SERVER_ID)
            assert (await request(srv.port, client, principal=OTHER_SERVER_ID))[1] is True
            # a client still expecting the old identity is refused (not resumed into it)
            with pytest.raises(ConnectionError, match="is not one of the expected"):
                await request(srv.port, client, principal=SERVER_ID)
        assert srv.seen[-1] == (CLIENT_ID, True)

    uvloop.run(main())


def test_sessions_are_offered_only_to_the_upstream_they_came_from(
    ca: CertificateAuthority,
) -> None:
    """Two listeners of the same server store (one SSL_CTX, so tickets would be accepted by
    both): a session of one is not offered to the other, nor under another expected identity."""
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        with InboundServer(server) as a, InboundServer(server) as b:
            await request(a.port, client)
            assert (await request(a.port, client))[1] is True
            assert (await request(b.port, client))[1] is False  # another address
            pinned = TlsSettings(mode="ISTIO_MUTUAL", subject_alt_names=(SERVER_ID,))
            assert (await request(a.port, client, tls=pinned))[1] is False  # other expectation
            assert (await request(a.port, client, tls=pinned))[1] is True
        ctx = upstream_context(AUTO_MTLS, client)
        assert isinstance(ctx, ResumingClientContext) and len(ctx.sessions) == 3

    uvloop.run(main())


class FakeConn:
    """What ``SessionCache`` reads of an ``SSLObject``."""

    def __init__(self, sess: Any, reused: bool = True) -> None:
        self.session = sess
        self.session_reused = reused

    def version(self) -> str:
        return "TLSv1.3"


class FakeSession:
    def __init__(self, ticket: bool = True, age: float = 0.0, timeout: int = 7200) -> None:
        self.has_ticket, self.id = ticket, b"x"
        self.time, self.timeout = int(time.time() - age), timeout


def test_session_cache_keeps_the_last_good_session_until_a_newer_ticket_arrives() -> None:
    cache = SessionCache(max_entries=2, refresh_after=0)  # take the newest ticket every time
    good, newer = FakeSession(), FakeSession()
    cache.remember("a", FakeConn(good))  # type: ignore[arg-type]
    assert cache.offer("a") is good
    cache.remember("a", FakeConn(FakeSession(False)))  # type: ignore[arg-type] # no ticket yet
    assert cache.offer("a") is good
    cache.remember("a", FakeConn(newer))  # type: ignore[arg-type]
    assert cache.offer("a") is newer
    cache.remember("b", FakeConn(FakeSession(age=8000)))  # type: ignore[arg-type] # expired
    assert cache.offer("b") is None
    cache.remember("c", FakeConn(FakeSession()))  # type: ignore[arg-type]
    assert cache.offer("a") is None and len(cache) == 2  # least recently used dropped


def test_session_cache_offers_one_session_until_refresh_or_expiry() -> None:
    cache = SessionCache(refresh_after=60)
    first = FakeSession()
    cache.remember("a", FakeConn(first, reused=False))  # type: ignore[arg-type]
    assert cache.offer("a") is first
    for _ in range(3):  # later connections resumed it: their tickets are not taken (no copy)
        cache.remember("a", FakeConn(FakeSession()))  # type: ignore[arg-type]
        assert cache.offer("a") is first
    # a session near its end is refreshed at half its remaining lifetime, not after 60 s
    short = FakeSession(timeout=SESSION_EXPIRY_MARGIN + 2)
    cache.remember("s", FakeConn(short, reused=False))  # type: ignore[arg-type]
    assert cache.offer("s") is short
    later = FakeSession()
    cache.remember("s", FakeConn(later))  # type: ignore[arg-type]
    eventually_sync(
        lambda: cache.offer("s") is not short, timeout=5, what="the short session refreshed"
    )
    assert cache.offer("s") is later
    # expiry is honoured even when no newer ticket came: a full handshake then
    dying = FakeSession(age=7200 - SESSION_EXPIRY_MARGIN - 1)
    cache.remember("d", FakeConn(dying, reused=False))  # type: ignore[arg-type]
    assert cache.offer("d") is dying
    eventually_sync(
        lambda: cache.offer("d") is not dying, timeout=5, what="the dying session dropped"
    )
    assert cache.offer("d") is None
    # the server refused the offered session (restart, rotation): its new ticket is taken
    newest = FakeSession()
    cache.remember("a", FakeConn(newest, reused=False))  # type: ignore[arg-type]
    assert cache.offer("a") is newest


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_one_session_offered_to_many_connections_resumes_each(
    ca: CertificateAuthority, loop_kind: str
) -> None:
    """The inbound listener's stateful TLS 1.3 tickets are accepted more than once: the
    client offers the same ``SSLSession`` object again and again and every connection is
    resumed on both sides, with both identities known."""
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        ctx = upstream_context(AUTO_MTLS, client)
        assert isinstance(ctx, ResumingClientContext)
        ctx.sessions.refresh_after = 60  # no refresh during the test, however slow the machine
        with InboundServer(server) as srv:
            key = ("127.0.0.1", srv.port, None, SERVER_ID, ())
            assert (await request(srv.port, client))[1] is False
            offered = ctx.sessions.offer(key)
            assert offered is not None
            for _ in range(4):
                assert await request(srv.port, client) == (b"echo:hi", True, SERVER_ID)
                assert ctx.sessions.offer(key) is offered  # the same session, not a copy
        assert srv.seen == [(CLIENT_ID, False)] + [(CLIENT_ID, True)] * 4
        assert server.inbound_stats == {"ssl_handshake": 5, "ssl_session_reused": 4}

    on_both_loops(main, loop_kind)


def test_session_offered_many_times_after_rotation_is_a_full_handshake(
    ca: CertificateAuthority,
) -> None:
    """A session reused for many connections is still refused after the server's
    certificate rotates (full handshake, new identity checked), and the client then takes
    the new connection's ticket at once instead of offering the dead one until refresh."""
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)

    async def main() -> None:
        ctx = upstream_context(AUTO_MTLS, client)
        assert isinstance(ctx, ResumingClientContext)
        with InboundServer(server) as srv:
            key = ("127.0.0.1", srv.port, None, SERVER_ID, ())
            await request(srv.port, client)
            for _ in range(3):
                assert (await request(srv.port, client))[1] is True
            old = ctx.sessions.offer(key)
            rotate(server, ca, SERVER_ID)
            assert (await request(srv.port, client))[1] is False
            assert ctx.sessions.offer(key) is not old
            for _ in range(2):
                assert (await request(srv.port, client))[1] is True
        assert [r for _, r in srv.seen] == [False, True, True, True, False, True, True]

    uvloop.run(main())


def test_simple_tls_context_is_built_once_per_file_version(
    ca: CertificateAuthority, tmp_path
) -> None:
    store = CertificateStore()
    pem = tmp_path / "ca.pem"
    pem.write_text(ca.trust_bundle_pem())
    simple = TlsSettings(mode="SIMPLE", ca_certificates=str(pem))
    first = upstream_context(simple, store)
    assert upstream_context(simple, store) is first  # not one context per connection
    assert isinstance(first, ResumingClientContext)
    pem.write_text(ca.trust_bundle_pem() + "\n")  # the file changed (new mtime/inode)
    import os

    st = os.stat(pem)
    os.utime(pem, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert upstream_context(simple, store) is not first
    assert isinstance(first, ssl.SSLContext) and first.verify_mode == ssl.CERT_REQUIRED


def _pump(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    """Move TLS records between two in-memory ``SSLObject``s until the handshake is done."""
    for _ in range(20):
        for x, y in ((a, b), (b, a)):
            data = x[2].read()
            if data:
                y[1].write(data)
        for x in (a, b):
            try:
                x[0].do_handshake()
            except ssl.SSLWantReadError:
                pass
        if a[0].session_reused is not None and not a[2].pending and not b[2].pending:
            if getattr(a[0], "_done", False):
                return
            a[0]._done = True  # one more round so the last flight is delivered


def _memory_pair(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[Any, Any]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client_ctx.wrap_bio(c_in, c_out)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    _pump((c, c_in, c_out), (s, s_in, s_out))
    return (c, c_in, c_out), (s, s_in, s_out)


def _exchange(c: tuple[Any, ...], s: tuple[Any, ...]) -> None:
    """One request and response: the client reads the server's ticket on the way."""
    c[0].write(b"q")
    s[1].write(c[2].read())
    assert s[0].read() == b"q"
    s[0].write(b"r")
    c[1].write(s[2].read())
    assert c[0].read() == b"r"


@pytest.mark.parametrize("native", [True, False])
def test_shared_session_freed_before_its_ticket_is_replaced_not_offered(
    ca: CertificateAuthority, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL marks a session not resumable when a connection still using it is freed
    uncleanly (openssl/openssl#1550). Offered without CPython's copy, the cache notices that
    and offers the newest connection's ticket instead (no full handshake)."""
    from diktyo.proxy.network import tls as tls_mod

    monkeypatch.setattr(tls_mod, "_NATIVE", [] if native else [None])
    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)
    sctx = server.server_context()
    cctx = client.client_context()
    assert isinstance(cctx, ResumingClientContext)
    cache = cctx.sessions
    servers: list[tuple[Any, ...]] = []

    def connect(exchange: bool = True) -> tuple[bool, tuple[Any, ...]]:
        token = tls_mod.offering(cache.offer("k"))
        try:
            c, s = _memory_pair(cctx, sctx)
        finally:
            token.var.reset(token)
        if exchange:
            _exchange(c, s)
        cache.remember("k", c[0])
        servers.append(s)  # an uncleanly freed server side would drop its cached session
        assert tls_mod.peer_spiffe_id(c[0]) == SERVER_ID
        assert tls_mod.peer_spiffe_id(s[0]) == CLIENT_ID
        return bool(c[0].session_reused), c

    assert connect()[0] is False
    assert [connect()[0] for _ in range(3)] == [True] * 3
    assert (tls_mod._NATIVE[0] is not None) is native  # the no-copy path was taken
    reused, dying = connect(exchange=False)  # handshake only: its ticket is never read
    assert reused is True
    cache.remember("k", connect()[1][0])  # keep the cache off the dying connection
    del dying  # freed uncleanly while still holding the shared session
    import gc

    gc.collect()
    # native: the cache sees that OpenSSL marked the shared session not resumable and takes
    # the newest connection's ticket instead; the copying setter hands OpenSSL a fresh copy
    # (resumable again): either way no full handshake
    assert [connect()[0] for _ in range(4)] == [True] * 4


def test_session_copy_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    from diktyo.proxy.network import tls as tls_mod

    monkeypatch.setenv("DIKTYO_TLS_SESSION_COPY", "1")
    assert tls_mod._native_setter() is None
    monkeypatch.delenv("DIKTYO_TLS_SESSION_COPY")
    assert tls_mod._native_setter() is not None  # CPython 3.11 with its _ssl layout


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_pool_close_keeps_the_servers_session_resumable(
    ca: CertificateAuthority, loop_kind: str
) -> None:
    """``UpstreamConnection.close`` (maxRequestsPerConnection, idle timeout) aborts without
    waiting; it sends close_notify first, else OpenSSL on the server side drops the stateful
    session of that connection's ticket (a bare EOF is an unclean close) and the next
    connection, offered that ticket, needs a full handshake."""
    from diktyo.proxy.network.upstream import UpstreamConnection

    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)
    lost: list[int] = []

    class Server(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(1)

    class Pool:
        closed = 0

        def connection_closed(self, conn: object) -> None:
            Pool.closed += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        port = sock.getsockname()[1]

        async def serve() -> None:
            while True:
                s, _ = await loop.sock_accept(sock)
                await accept_inbound(loop, s, Server, "STRICT", server, 5)

        task = loop.create_task(serve())
        ep = Endpoint(address="127.0.0.1", port=port, principal=SERVER_ID, has_sidecar=True)
        resumed = []
        try:
            for i in range(4):
                conn = UpstreamConnection(Pool(), ("127.0.0.1", port))
                t, _ = await asyncio.wait_for(
                    open_upstream(loop, "127.0.0.1", port, None, lambda c=conn: c, ep, client), 5
                )
                so = t.get_extra_info("ssl_object")
                resumed.append(bool(so.session_reused))
                conn.secure = True  # as the pool sets it
                await eventually(
                    lambda so=so: so.session is not None and so.session.has_ticket,
                    timeout=5,
                    what="the server's ticket read by the client",
                )
                conn.close()
                await eventually(
                    lambda n=i + 1: len(lost) == n, timeout=5, what="the server side closed"
                )
        finally:
            task.cancel()
            sock.close()
        assert resumed == [False, True, True, True]
        assert Pool.closed == 4

    on_both_loops(main, loop_kind)


def test_server_session_cache_is_capped_and_resumption_goes_on(ca: CertificateAuthority) -> None:
    """Every connection's ticket is a stateful session in the server context's cache, kept
    for 2 h: the cache is capped (OpenSSL evicts the oldest), and as clients offer a recent
    session, connections keep resuming past the cap."""
    from diktyo.proxy.network import tls as tls_mod

    server, client = store_for(ca, SERVER_ID), store_for(ca, CLIENT_ID)
    sctx = server.server_context(require_client_cert=True, alpn=tls_mod.INBOUND_ALPN)
    assert tls_mod.limit_session_cache(sctx, 8)

    async def main() -> None:
        with InboundServer(server) as srv:
            resumed = [(await request(srv.port, client))[1] for _ in range(20)]
            # every connection offers the session of the first one, the oldest in the
            # server's cache: once evicted, one full handshake, then a recent one is offered
            assert resumed.count(False) <= 3, resumed
            await eventually(lambda: len(srv.seen) == 20, timeout=5, what="20 accepted")
        stats = sctx.session_stats()
        assert 0 < stats["number"] <= 8, stats
        assert stats["cache_full"] > 0, stats

    uvloop.run(main())

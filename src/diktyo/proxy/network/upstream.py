"""Upstream connections: the one place that opens sockets to endpoints (TLS seam included).

``open_upstream(loop, address, port, tls_settings, factory)`` creates the transport; a later
mTLS engineer adds the client ``SSLContext`` there and nowhere else. ``UpstreamConnection`` is
the asyncio Protocol of one pooled HTTP/1.1 connection: its ``Http1ClientCodec`` encodes
requests and decodes responses, and the events go to the requester currently attached to it
(``UpstreamCallbacks``: one upstream attempt or a mirror copy; ``stream`` is ``None`` while
idle in the pool, in which case any byte or EOF just closes it).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from diktyo.proxy.codec.events import (
    ClientCodec,
    ClientSink,
    ClientSinkBase,
    CodecError,
    HeaderList,
    ResetReason,
    ResponseHead,
)
from diktyo.proxy.codec.http1 import Http1ClientCodec
from diktyo.snapshot.model import TlsSettings

log = logging.getLogger("diktyo.proxy")


def client_ssl_context(tls: TlsSettings | None) -> ssl.SSLContext | None:
    """The client context for ``tls`` without a workload certificate (None for plaintext)."""
    if tls is None or tls.mode == "DISABLE":
        return None
    ctx = ssl.create_default_context(cafile=tls.ca_certificates)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_certificate and tls.private_key:
        ctx.load_cert_chain(tls.client_certificate, tls.private_key)
    return ctx


AUTO_MTLS = TlsSettings(mode="ISTIO_MUTUAL")


def effective_tls(tls: TlsSettings | None, endpoint: Any, certs: Any) -> TlsSettings | None:
    """Istio's auto mTLS: without ``trafficPolicy.tls``, endpoints with a sidecar get ISTIO_MUTUAL
    (when this sidecar has a workload certificate); ``mode: DISABLE`` turns TLS off."""
    if tls is None:
        if endpoint is not None and endpoint.has_sidecar and certs is not None and certs.ready:
            return AUTO_MTLS
        return None
    if tls.mode == "DISABLE":
        return None
    return tls


def is_secure(tls: TlsSettings | None, endpoint: Any, certs: Any) -> bool:
    """Whether a connection to ``endpoint`` speaks TLS (pools keep plaintext and TLS apart)."""
    return effective_tls(tls, endpoint, certs) is not None


async def open_upstream(
    loop: asyncio.AbstractEventLoop,
    address: str,
    port: int,
    tls_settings: TlsSettings | None,
    factory: Callable[[], asyncio.Protocol],
    endpoint: Any = None,
    certs: Any = None,
    alpn: tuple[str, ...] = (),
) -> tuple[Any, Any]:
    """Open one upstream transport: plaintext, auto/ISTIO_MUTUAL mTLS or SIMPLE/MUTUAL TLS.

    ``endpoint`` (snapshot Endpoint) and ``certs`` (the sidecar's ``CertificateStore``) enable
    auto mTLS; ``alpn`` (HTTP/2 pools: ``tls.H2_ALPN``) replaces the protocols offered. After a TLS handshake the server's identity is checked (``verify_upstream``:
    the endpoint's SPIFFE id or the rule's ``subjectAltNames``); a mismatch closes the
    connection and raises ``ConnectionError`` with the reason.
    """
    tls = effective_tls(tls_settings, endpoint, certs)
    if tls is None:
        return await loop.create_connection(factory, address, port)
    from diktyo.proxy.network.tls import (
        CertificateStore,
        TlsConfigError,
        describe_tls_error,
        offering,
        resumed_peer_problem,
        upstream_context,
        verify_upstream,
    )
    from diktyo.proxy.network.tlsrecord import new_tls

    try:
        ctx = upstream_context(tls, certs if certs is not None else CertificateStore(), alpn)
    except TlsConfigError as exc:
        log.warning("upstream %s:%d: %s", address, port, exc)
        raise ConnectionError(str(exc)) from None
    assert ctx is not None
    if tls.mode == "ISTIO_MUTUAL":
        sni = tls.sni or None
    else:
        sni = tls.sni or address
    principal = endpoint.principal if endpoint is not None else ""
    # TLS session resumption: offer the newest session of this upstream (same context, so
    # the same certificates and trust bundle; same address, SNI and expected identity)
    sessions = getattr(ctx, "sessions", None)
    key = (address, port, sni, principal, tls.subject_alt_names)
    token = offering(sessions.offer(key)) if sessions is not None else None
    protocol = factory()
    try:  # TLS on a plain TCP transport: diktyo's own record layer (``tlsrecord``)
        transport, handshake = new_tls(loop, ctx, protocol, False, sni)
    finally:
        if token is not None:
            token.var.reset(token)
    try:
        await loop.create_connection(lambda: transport, address, port)
        await handshake
    except ssl.SSLError as exc:
        transport.abort()
        if sessions is not None:
            sessions.forget(key)
        reason = describe_tls_error(exc)
        log.warning("upstream %s:%d: TLS handshake failed: %s", address, port, reason)
        raise ConnectionError(reason) from None
    except BaseException:  # refused, reset, timed out or cancelled: nothing stays open
        transport.abort()
        raise
    so = transport.get_extra_info("ssl_object")
    ok, reason = verify_upstream(so, tls, principal)
    if ok:
        problem = resumed_peer_problem(so)
        if problem:
            ok, reason = False, problem
    if not ok:
        if sessions is not None:
            sessions.forget(key)
        transport.abort()
        log.warning("upstream %s:%d refused: %s", address, port, reason)
        raise ConnectionError(reason)
    if sessions is not None and so is not None:
        sessions.remember(key, so)
    return transport, protocol


class Dialable(Protocol):
    """What ``dial`` sets on the connection it opened for a pool."""

    transport: Any
    secure: bool
    stale: bool


_D = TypeVar("_D", bound=Dialable)


async def dial(pool: Any, host: Any, make: Callable[[], _D], alpn: tuple[str, ...] = ()) -> (
    tuple[_D | None, str]
):  # fmt: skip
    """Open one connection of ``pool`` (HTTP/1 or HTTP/2) to ``host`` within the cluster's
    connect timeout; timeouts and failures are counted in the pool's cluster stats.

    Returns ``(connection, "")`` with ``secure`` (TLS) and ``stale`` (opened under settings
    the pool drained meanwhile) set, or ``(None, error)``."""
    cluster = pool.state.cluster
    generation = pool.generation
    box: list[_D] = []

    def factory() -> asyncio.Protocol:
        c = make()
        box.append(c)
        return cast(asyncio.Protocol, c)

    try:
        async with asyncio.timeout(cluster.pool.connect_timeout):
            await open_upstream(
                pool.loop, host.address, host.port, cluster.tls, factory, host.endpoint,
                pool.certs, alpn=alpn,
            )  # fmt: skip
    except TimeoutError:
        pool.stats.inc_cluster(pool.name, "upstream_cx_connect_timeout")
        return None, "connection timeout"
    except (OSError, ValueError):
        pool.stats.inc_cluster(pool.name, "upstream_cx_connect_fail")
        return None, "connection failure"
    conn = box[0]
    t = conn.transport
    so = t.get_extra_info("ssl_object") if t is not None else None
    conn.secure = so is not None
    if so is not None:  # Envoy's cluster ssl.handshake / ssl.session_reused
        pool.stats.inc_cluster(pool.name, "ssl_handshake")
        if so.session_reused:
            pool.stats.inc_cluster(pool.name, "ssl_session_reused")
    if generation != pool.generation:
        conn.stale = True  # opened under settings drained meanwhile
    return conn, ""


class UpstreamConnectionLike(Protocol):
    """What a requester uses of the connection the pool handed it: the codec (``events.
    ClientCodec``) to encode its stream, ``write`` to send what was encoded, ``reset_stream``
    to abandon its stream (HTTP/1.1: the connection closes; HTTP/2: RST_STREAM), read
    pausing, and ``reused`` (it served a request before: the keep-alive race)."""

    reused: bool
    closed: bool

    @property
    def codec(self) -> ClientCodec: ...
    def write(self) -> None: ...
    def reset_stream(self, sid: int) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class UpstreamCallbacks(ClientSink, Protocol):
    """What a pooled connection and its pool call on the requester holding it: one upstream
    attempt (``proxy.http.upstream_request.UpstreamRequest``) or a mirror copy. While it
    holds the connection the requester *is* the codec's ``ClientSink``: response events go
    to it with no hop through the connection."""

    # pool
    def attach(self, conn: UpstreamConnectionLike) -> None: ...
    def overflow(self, message: str) -> None: ...
    def connect_failed(self, reason: str) -> None: ...

    # connection (decoded response, failures, write flow control)
    def on_upstream_lost(self, reason: str, started: bool) -> None: ...
    def on_upstream_protocol_error(self, detail: str) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...
    def flush_downstream(self) -> None: ...


class Requester(ClientSinkBase):
    """``UpstreamCallbacks`` as a class: the upstream attempt (``proxy.http.upstream_request.
    UpstreamRequest``) subclasses it. Compiled, the pool and the connection call a requester
    that is one natively (``isinstance``); a mirror copy still satisfies the Protocol and is
    called the generic way (issue 11, `lean`)."""

    def attach(self, conn: UpstreamConnectionLike) -> None:
        raise NotImplementedError

    def overflow(self, message: str) -> None:
        raise NotImplementedError

    def connect_failed(self, reason: str) -> None:
        raise NotImplementedError

    def on_upstream_lost(self, reason: str, started: bool) -> None:
        raise NotImplementedError

    def on_upstream_protocol_error(self, detail: str) -> None:
        raise NotImplementedError

    def upstream_pause_writing(self) -> None:
        raise NotImplementedError

    def upstream_resume_writing(self) -> None:
        raise NotImplementedError

    def flush_downstream(self) -> None:
        raise NotImplementedError


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to one upstream host, reused through the pool. Its codec's
    events go to the requester attached to it (``stream``); while idle, any byte or EOF
    closes it."""

    __slots__ = (
        "closed",
        "codec",
        "idle_since",
        "key",
        "pool",
        "read_paused",
        "requests",
        "reused",
        "secure",
        "stale",
        "stream",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: Any, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.codec = Http1ClientCodec(self)
        self.stream: UpstreamCallbacks | None = None
        self.requests = 0
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.write_paused = False
        self.read_paused = False
        self.secure = False  # TLS (mTLS) connection: set by the pool when it opens it
        self.stale = False  # TLS-ness no longer what the config wants: close when released

    @property
    def keep_alive(self) -> bool:
        return self.codec.keep_alive

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # create_connection gives a Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            self.close()  # bytes while idle: protocol violation
            return
        try:
            self.codec.decoder.feed(data)  # compiled: a native call (codec.feed is generic)
        except CodecError as exc:
            self.close()
            stream.on_upstream_protocol_error(exc.message)
            return
        if self.stream is stream:  # (a finished response already went out, and released us)
            # what this read produced, in one downstream write
            if isinstance(stream, Requester):  # compiled: a native call
                stream.flush_downstream()
            else:
                stream.flush_downstream()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        stream = self.stream
        if stream is not None:
            self.codec.eof()  # may end a close-delimited body (the stream then detaches)
            stream = self.stream
            if stream is not None:
                self.hand_to(None)
                stream.on_upstream_lost("connection termination", self.codec.started)
        if not was_closed:
            self.pool.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        s = self.stream
        if s is not None:
            s.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        s = self.stream
        if s is not None:
            s.upstream_resume_writing()

    def hand_to(self, requester: UpstreamCallbacks | None) -> None:
        """Attach the requester the pool gave this connection to (None: idle again)."""
        self.stream = requester
        self.codec.sink = self if requester is None else requester

    # -- codec sink (ClientSink) while idle or between requesters: forward if attached
    def on_response_headers(self, sid: int, head: ResponseHead) -> None:
        s = self.stream
        if s is not None:
            s.on_response_headers(sid, head)

    def on_response_data(self, sid: int, data: bytes) -> None:
        s = self.stream
        if s is not None:
            s.on_response_data(sid, data)

    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None:
        s = self.stream
        if s is not None:
            s.on_response_trailers(sid, trailers)

    def on_response_end(self, sid: int) -> None:
        s = self.stream
        if s is not None:
            s.on_response_end(sid)

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        s = self.stream
        if s is not None:
            self.hand_to(None)
            s.on_upstream_lost(reason.value, self.codec.started)

    def on_send_blocked(self, sid: int) -> None:
        pass  # HTTP/1.1: the transport's pause_writing does this

    def on_send_unblocked(self, sid: int) -> None:
        pass

    # -- helpers
    def write(self) -> None:
        """Write what the codec encoded (one ``transport.write``)."""
        codec = self.codec
        if codec.out:
            data = codec.data_to_send()
            if self.transport is not None and not self.closed:
                self.transport.write(data)

    def reset_stream(self, sid: int) -> None:
        """Abandon the stream in flight: HTTP/1.1 can only close the connection."""
        self.close()

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.hand_to(None)
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                if self.secure:  # close_notify first, not awaited: an upstream that sees a bare
                    self.transport.close()  # EOF drops this connection's TLS session ticket
                self.transport.abort()
            self.pool.connection_closed(self)

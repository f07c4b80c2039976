"""Upstream connections: the one place that opens sockets to endpoints (TLS seam included).

``open_upstream(loop, address, port, tls_settings, factory)`` creates the transport; a later
mTLS engineer adds the client ``SSLContext`` there and nowhere else. ``UpstreamConnection`` is
the asyncio Protocol of one pooled HTTP/1.1 connection: it decodes responses with the codec
and hands the events to the stream currently attached to it (``stream`` may be ``None`` while
idle in the pool, in which case any byte or EOF just closes it).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from diktyo.proxy.codec.http1 import CodecError, ResponseDecoder
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
        upstream_context,
        verify_upstream,
    )

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
    try:
        transport, protocol = await loop.create_connection(
            factory, address, port, ssl=ctx, server_hostname=sni
        )
    except ssl.SSLError as exc:
        reason = describe_tls_error(exc)
        log.warning("upstream %s:%d: TLS handshake failed: %s", address, port, reason)
        raise ConnectionError(reason) from None
    principal = endpoint.principal if endpoint is not None else ""
    ok, reason = verify_upstream(transport.get_extra_info("ssl_object"), tls, principal)
    if not ok:
        transport.abort()
        log.warning("upstream %s:%d refused: %s", address, port, reason)
        raise ConnectionError(reason)
    return transport, protocol


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to one upstream host, reused through the pool."""

    __slots__ = (
        "closed",
        "decoder",
        "idle_since",
        "keep_alive",
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
        self.decoder = ResponseDecoder(self)
        self.stream: Any = None
        self.requests = 0
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.keep_alive = True
        self.write_paused = False
        self.read_paused = False
        self.secure = False  # TLS (mTLS) connection: set by the pool when it opens it
        self.stale = False  # TLS-ness no longer what the config wants: close when released

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self.stream is None:
            self.close()  # bytes while idle: protocol violation
            return
        stream = self.stream
        try:
            self.decoder.feed(data)
        except CodecError as exc:
            self.close()
            stream.on_upstream_protocol_error(self, exc.message)
            return
        if stream.obuf:
            stream.flush_downstream()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        stream = self.stream
        if stream is not None:
            if self.decoder.eof():
                stream = self.stream  # the stream may have detached on response end
            if stream is not None:
                self.stream = None
                stream.on_upstream_lost(self, "connection termination", self.decoder.started)
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

    # -- codec sink: forward to the attached stream
    def on_response_head(self, status: int, block: bytes, ka: bool) -> None:
        self.keep_alive = ka
        s = self.stream
        if s is not None:
            s.on_response_head(status, block, ka)

    def on_response_body(self, chunk: bytes) -> None:
        s = self.stream
        if s is not None:
            s.on_response_body(chunk)

    def on_response_end(self) -> None:
        s = self.stream
        if s is not None:
            s.on_response_end()

    # -- helpers
    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.stream = None
        self.decoder.sink = self
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.connection_closed(self)

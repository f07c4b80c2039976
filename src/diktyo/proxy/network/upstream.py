"""Upstream connections: the one place that opens sockets to endpoints (TLS seam included).

``open_upstream(loop, address, port, tls_settings, factory)`` creates the transport; a later
mTLS engineer adds the client ``SSLContext`` there and nowhere else. ``UpstreamConnection`` is
the asyncio Protocol of one pooled HTTP/1.1 connection: it decodes responses with the codec
and hands the events to the stream currently attached to it (``stream`` may be ``None`` while
idle in the pool, in which case any byte or EOF just closes it).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from diktyo.proxy.codec.http1 import CodecError, ResponseDecoder
from diktyo.snapshot.model import TlsSettings


def client_ssl_context(tls: TlsSettings | None) -> ssl.SSLContext | None:
    """TLS seam: the client context for ``tls`` (None for plaintext)."""
    if tls is None or tls.mode == "DISABLE":
        return None
    ctx = ssl.create_default_context(cafile=tls.ca_certificates)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_certificate and tls.private_key:
        ctx.load_cert_chain(tls.client_certificate, tls.private_key)
    return ctx


async def open_upstream(
    loop: asyncio.AbstractEventLoop,
    address: str,
    port: int,
    tls_settings: TlsSettings | None,
    factory: Callable[[], asyncio.Protocol],
) -> tuple[Any, Any]:
    """Open one upstream transport (plaintext or TLS per ``tls_settings``)."""
    ctx = client_ssl_context(tls_settings)
    if ctx is None:
        return await loop.create_connection(factory, address, port)
    sni = tls_settings.sni if tls_settings is not None and tls_settings.sni else address
    return await loop.create_connection(factory, address, port, ssl=ctx, server_hostname=sni)


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
            stream.on_upstream_lost(self, f"protocol error: {exc.message}", False)
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

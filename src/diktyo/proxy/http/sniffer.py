"""The first protocol of every downstream HTTP connection: HTTP/2 or HTTP/1.1, decided once.

- TLS with ALPN ``h2`` / ``istio-h2`` negotiated -> ``Http2Connection`` at once;
- otherwise the first bytes: the HTTP/2 connection preface (``PRI * HTTP/2.0``...: h2c with
  prior knowledge) -> ``Http2Connection``; anything else -> the HTTP/1.1 ``HttpConnection``.

The HTTP/2 side (``h2_connection``, its codec and the ``h2`` library, ~3 MiB) is imported on the
first HTTP/2 connection, not when the sidecar starts: a sidecar that only ever speaks
HTTP/1.1 never loads it (issue 11's idle-memory target; ``tests/proxy/test_sidecar_modules.py``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from diktyo.proxy.codec.http2_common import PREFACE  # no h2 import: the preface alone
from diktyo.proxy.http.connection_manager import HttpConnection

if TYPE_CHECKING:
    from diktyo.proxy.http.context import ListenerContext

H2_ALPN = frozenset({"h2", "istio-h2"})


def _http2(ctx: ListenerContext) -> asyncio.Protocol:
    from diktyo.proxy.http.h2_connection import Http2Connection  # first HTTP/2 connection

    return Http2Connection(ctx)


class DownstreamSniffer(asyncio.Protocol):
    """The first protocol of every downstream HTTP connection: decides HTTP/2 or HTTP/1.1."""

    __slots__ = ("buf", "ctx", "transport")

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio hands a BaseTransport; TCP/TLS give Transports
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() in H2_ALPN:
            self._become(_http2(self.ctx), b"")

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = min(len(buf), len(PREFACE))
        if buf[:n] != PREFACE[:n]:
            self._become(HttpConnection(self.ctx), buf)
        elif len(buf) >= len(PREFACE):
            self._become(_http2(self.ctx), buf)
        else:
            self.buf = buf  # a prefix of the preface so far: wait for more

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def _become(self, proto: asyncio.Protocol, data: bytes) -> None:
        t = self.transport
        assert t is not None
        self.buf = b""
        t.set_protocol(proto)
        proto.connection_made(t)
        if data:
            proto.data_received(data)

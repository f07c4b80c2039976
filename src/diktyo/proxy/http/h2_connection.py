"""Downstream HTTP/2: protocol detection on accept, and the HTTP/2 connection of many streams.

Theory of operation
-------------------
Every HTTP listener's connections start as a ``DownstreamSniffer`` (``sniffer.py``, which
imports this module on the first HTTP/2 connection only). It picks the protocol once and hands
the transport over (``transport.set_protocol``): TLS with ALPN ``h2`` / ``istio-h2``, or the
HTTP/2 connection preface (h2c with prior knowledge) -> ``Http2Connection``; anything else ->
the HTTP/1.1 ``HttpConnection``.

``Http2Connection`` runs an ``Http2ServerCodec`` and one ``DownstreamStream`` per HTTP/2
stream, the same stream class HTTP/1.1 uses: routing, filters, retries and upstream attempts
do not know which protocol the client spoke. Each stream sees its connection through a
``_StreamConn`` view, so what a stream does to "its connection" stays per stream:

- ``pause``/``resume`` (request body buffered, upstream write buffer full) withhold or give
  back that stream's flow-control credit (the client stops at its stream window) instead of
  pausing the socket that all streams share;
- ``reset_stream`` sends RST_STREAM for that stream only;
- request DATA is acknowledged once the stream took it, unless the stream paused.

A response the client reads slowly blocks in the codec (``on_send_blocked``), and the stream
stops reading its upstream until the client's window opens again (``on_send_unblocked``).
Connection-level errors (floods, malformed frames) are answered with GOAWAY by the codec and
close the connection; the codec's ``http2.*`` counters are added to the listener's stats.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from diktyo.proxy.codec.events import CodecError, HeaderList, RequestHead, ResetReason
from diktyo.proxy.codec.http2_select import select_codec
from diktyo.proxy.http.connection_manager import DownstreamStream
from diktyo.proxy.http.phases import RESPONDING
from diktyo.proxy.network.h2pool import BATCH, H2StreamHandle, write_batch
from diktyo.proxy.network.peer import transport_peer

if TYPE_CHECKING:
    from diktyo.proxy.codec.http2 import Http2ServerCodec
    from diktyo.proxy.codec.http2_nghttp2 import NgHttp2ServerCodec
    from diktyo.proxy.http.context import ListenerContext

log = logging.getLogger("diktyo.proxy")


def _ng_server(codec: Any) -> NgHttp2ServerCodec | None:
    """``codec`` typed when it is libnghttp2's server codec (None for the `h2` one)."""
    from diktyo.proxy.codec.http2_nghttp2 import NgHttp2ServerCodec

    return codec if isinstance(codec, NgHttp2ServerCodec) else None


class _StreamConn:
    """What one ``DownstreamStream`` sees as its connection (see the module docstring)."""

    __slots__ = ("codec", "ctx", "h2", "paused", "peer", "sid")

    def __init__(self, h2: Http2Connection, sid: int) -> None:
        self.h2 = h2
        self.sid = sid
        self.ctx = h2.ctx
        self.codec = h2.codec
        self.peer = h2.peer
        self.paused = 0

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.h2.transport

    @property
    def closed(self) -> bool:
        return self.h2.closed

    @property
    def write_paused(self) -> bool:
        return self.h2.write_paused

    @property
    def close_after(self) -> bool:
        return False

    @close_after.setter
    def close_after(self, value: bool) -> None:
        pass  # HTTP/2: a bad or failed request costs its stream, not the connection

    def tls_peer(self) -> tuple[str, bytes | None]:
        return self.h2.tls_peer()

    def flush(self) -> None:
        self.h2.flush()

    def send_continue(self, sid: int) -> None:
        self.codec.send_continue(sid)
        self.h2.flush()

    def reset_stream(self, sid: int) -> None:
        self.codec.send_reset(sid, ResetReason.LOCAL_RESET)
        self.h2.flush()

    def pause(self, reason: int) -> None:
        if not self.paused:
            self.codec.pause_reading(self.sid)
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused:
                self.codec.resume_reading(self.sid)
                self.h2.flush()  # the WINDOW_UPDATE

    def stream_done(self, s: DownstreamStream) -> None:
        self.h2.stream_done(s)

    def internal_error(self, s: DownstreamStream) -> None:
        self.h2.internal_error(s)


class Http2Connection(asyncio.Protocol):
    """One downstream HTTP/2 connection: the HTTP/2 server codec's sink, many streams."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        # libnghttp2's codec or h2's (codec/http2_select.py): the same interface
        self.codec: Http2ServerCodec = select_codec()[0](self)
        # the same codec typed, when it is libnghttp2's: compiled, the calls both ways (codec
        # -> this connection, this connection -> codec) are native instead of generic
        self.ng: NgHttp2ServerCodec | None = _ng_server(self.codec)
        if self.ng is not None:
            self.ng.h2conn = self
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, DownstreamStream] = {}
        self.closed = False
        self.write_paused = False
        self.draining = False
        self.peer = ""
        self.last_activity = 0.0
        self.requests = 0
        self._touched: list[DownstreamStream] = []
        self._mtls_peer: tuple[str, bytes | None] | None = None

    # -- sidecar drain: no new streams (GOAWAY), close once the open ones are done
    @property
    def close_after(self) -> bool:
        return self.draining

    @close_after.setter
    def close_after(self, value: bool) -> None:
        if value and not self.draining:
            self.draining = True
            self.codec.drain()
            self.flush()
            if not self.streams:
                self._close()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio hands a BaseTransport; TCP/TLS give Transports
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.last_activity = time.monotonic()
        self.ctx.connections.add(self)
        server = self.ctx.stats.server
        server["downstream_cx_total"] += 1
        server["downstream_cx_http2_total"] = server.get("downstream_cx_http2_total", 0) + 1
        self.flush()  # our SETTINGS

    def data_received(self, data: bytes) -> None:
        with write_batch():  # one write per connection for everything this read produced
            self._data_received(data)

    def _data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        touched = self._touched
        ng = self.ng
        try:
            if ng is not None:  # compiled: a native call
                ng.feed(data)
            else:
                self.codec.feed(data)
        except CodecError as exc:
            log.warning(
                "downstream %s on listener %s: %s; closing the connection (GOAWAY sent)",
                self.peer,
                getattr(self.ctx, "name", "?"),
                exc.message,
            )
            self.flush()
            self._close()
            return
        if touched:
            for s in touched:
                u = s.upstream
                if u is not None:
                    uc: Any = u.conn  # (mypy: the handle is not quite UpstreamConnectionLike)
                    if isinstance(uc, H2StreamHandle):  # compiled: a native call
                        uc.conn.flush()  # what this read produced for that upstream, one write
                    elif uc is not None:
                        uc.write()
            touched.clear()
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        server = self.ctx.stats.server
        for k, v in self.codec.stats.as_dict().items():
            if v:
                server[k] = server.get(k, 0) + v
        streams = list(self.streams.values())
        self.streams.clear()
        for s in streams:
            s.downstream_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.codec.set_write_paused(True)
        for s in list(self.streams.values()):
            s.downstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.codec.set_write_paused(False)
        for s in list(self.streams.values()):
            s.downstream_write_paused(False)

    # -- codec events (ServerSink)
    def on_request_headers(self, sid: int, head: RequestHead) -> None:
        self.requests += 1
        s = DownstreamStream(_StreamConn(self, sid), sid, head)  # type: ignore[arg-type]  # _StreamConn is the per-stream HttpConnection view
        self.streams[sid] = s
        try:
            s.start()
        except Exception:  # noqa: BLE001 - a bug costs one request (logged, 500)
            self.internal_error(s)

    def on_request_data(self, sid: int, data: bytes) -> None:
        s = self.streams.get(sid)
        if s is not None:
            s.decode_data(data)
            self._touched.append(s)
        ng = self.ng  # credit withheld while the stream is paused
        if ng is not None:
            ng.acknowledge(sid, len(data))
        else:
            self.codec.acknowledge(sid, len(data))

    def on_request_trailers(self, sid: int, trailers: HeaderList) -> None:
        s = self.streams.get(sid)
        if s is not None:
            s.decode_trailers(trailers)
            self._touched.append(s)

    def on_request_end(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None:
            s.decode_end()
            self._touched.append(s)

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        s = self.streams.pop(sid, None)
        if s is not None:
            s.downstream_lost()

    def on_send_blocked(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None:
            s.downstream_write_paused(True)

    def on_send_unblocked(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None:
            s.downstream_write_paused(False)

    # -- what streams use
    flush_dirty = False

    def flush(self) -> None:
        b = BATCH  # defer_flush(self), inlined: native reads
        if b.depth:
            if not self.flush_dirty:
                self.flush_dirty = True
                b.dirty.append(self)
        else:
            self.flush_now()

    def flush_now(self) -> None:
        ng = self.ng
        data = ng.data_to_send() if ng is not None else self.codec.data_to_send()
        if data:
            t = self.transport
            if t is not None and not self.closed:
                t.write(data)

    def tls_peer(self) -> tuple[str, bytes | None]:
        """``(spiffe id, DER certificate)`` of the mTLS client, ``("", None)`` without."""
        peer = self._mtls_peer
        if peer is None:
            peer = self._mtls_peer = transport_peer(self.transport)
        return peer

    def stream_done(self, s: DownstreamStream) -> None:
        if self.streams.get(s.sid) is s:
            del self.streams[s.sid]
        self.flush()
        if self.draining and not self.streams:
            self._close()

    def internal_error(self, s: DownstreamStream) -> None:
        log.exception("internal error handling %s %s", s.head.method, s.head.path)
        server = self.ctx.stats.server
        server["downstream_rq_internal_error"] = server.get("downstream_rq_internal_error", 0) + 1
        if s.phase < RESPONDING:
            s.local_reply(500, b"internal proxy error", "")

    def idle_check(self, now: float, header_timeout: float, idle_timeout: float) -> None:
        """The sidecar's 1 s sweep: a connection without streams for ``idle_timeout`` gets
        GOAWAY and is closed (Envoy's idle timeout drains HTTP/2 connections)."""
        if self.closed or self.streams:
            return
        if now - self.last_activity > idle_timeout:
            self.codec.goaway(0, "idle timeout")
            self.flush()
            self._close()

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.flush_now()  # a deferred flush (GOAWAY...) goes out before the close
            self.closed = True
            self.transport.close()

    def describe(self) -> dict[str, Any]:
        return {"protocol": "HTTP/2", "streams": len(self.streams), "peer": self.peer}

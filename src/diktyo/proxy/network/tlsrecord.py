"""The mTLS record layer: TLS on a plain TCP transport, driven from ``data_received``.

uvloop's SSL transport (``create_connection(ssl=...)``, ``connect_accepted_socket(ssl=...)``)
costs most of what a reused mTLS connection adds to a request beyond OpenSSL itself: its
``SSLProtocol`` glue (buffered reads into a memory view, the write backlog, per-call context
copies, flow-control bookkeeping) and ssl.py's Python wrappers around the C ``_ssl`` object,
called several times per record. ``TlsTransport`` does the same job with less: it is the
protocol of a plain TCP transport and the transport of the application's protocol at once.

- read: the TCP bytes go into the incoming ``MemoryBIO``; the C-level SSL object's ``read``
  returns one record's plaintext (16 KiB at most) per call, handed to the application's
  ``data_received`` in the same call; ``MemoryBIO.pending`` / ``pending()`` end the loop, so a
  whole record raises no ``SSLWantReadError``;
- write: ``SSL_write`` into the outgoing BIO, then one ``transport.write`` of its bytes;
- the handshake, ``close_notify`` both ways, EOF, errors and flow control as uvloop's
  ``SSLProtocol`` does them (see the methods); the ``ssl.SSLObject`` of the connection (ALPN,
  peer certificate, session, resumption) is ``get_extra_info("ssl_object")`` as before.

The SSL object is made by the caller from the sidecar's context (``wrap_bio``: session
resumption, ALPN and the record-sized reads of ``tls.py`` stay as they are). ``tls.
accept_inbound`` and ``upstream.open_upstream`` use it for every TLS connection they open.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

log = logging.getLogger("diktyo.proxy")

# the largest plaintext of one TLS record (RFC 8446 5.1); one SSL_read returns one record's
RECORD_PLAINTEXT = 16384
# uvloop's default handshake timeout (asyncio's too)
HANDSHAKE_TIMEOUT = 60.0

# states
_HANDSHAKE = 0
_OPEN = 1
_CLOSING = 2  # close_notify sent (ours, or in answer to the peer's): no more application data
_CLOSED = 3  # aborted, failed or lost


class TlsTransport(asyncio.Protocol):
    """TLS over the TCP transport it is the protocol of; the application protocol's transport.

    ``waiter`` gets ``None`` when the handshake succeeded (the application's
    ``connection_made`` has been called just before) or the handshake's exception (then the
    application sees nothing). Build one with ``client``/``server`` below."""

    __slots__ = (
        "_app",
        "_app_connected",
        "_context",
        "_exc",
        "_in",
        "_loop",
        "_out",
        "_read_paused",
        "_ssl",
        "_state",
        "_tcp",
        "_timeout",
        "_timer",
        "_waiter",
        "_write_paused",
        "ssl_object",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        app: asyncio.BaseProtocol,
        waiter: asyncio.Future[None] | None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self._loop = loop
        self._context = context
        self.ssl_object = ssl_object
        # the C-level ``_ssl._SSLSocket`` behind ``ssl.SSLObject``: its read/write/pending are
        # called directly (ssl.py's methods are one-line Python wrappers around them)
        self._ssl: Any = getattr(ssl_object, "_sslobj", ssl_object)
        self._in = incoming
        self._out = outgoing
        self._app: Any = app
        self._app_connected = False
        self._waiter = waiter
        self._timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._tcp: Any = None
        self._state = _HANDSHAKE
        self._read_paused = False
        self._write_paused = False
        self._exc: BaseException | None = None

    # ------------------------------------------------------------ TCP side (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport
        self._timer = self._loop.call_later(self._timeout, self._handshake_timed_out)
        self._handshake()  # the client's ClientHello; the server waits for one

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        state = self._state
        if state == _OPEN:
            if not self._read_paused:
                self._read()
        elif state == _HANDSHAKE:
            self._handshake()
        elif state == _CLOSING:
            self._read_into_void()

    def eof_received(self) -> bool | None:
        # the peer closed TCP: without close_notify (a truncation, or a close after ours) the
        # connection simply ends, as with uvloop's SSL protocol (no eof_received to the
        # application); during the handshake it fails it
        if self._state == _HANDSHAKE:
            self._fail_handshake(ConnectionResetError("connection closed during TLS handshake"))
        return False  # the TCP transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self._tcp = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiter is not None:
            self._fail_handshake(
                exc if exc is not None else ConnectionResetError(
                    "connection closed during TLS handshake"
                )
            )
        if self._app_connected:
            self._app_connected = False
            if exc is None and isinstance(self._exc, Exception):
                exc = self._exc
            self._app.connection_lost(exc)
        # the protocol usually holds this transport: break the cycle (as uvloop's transports
        # do), so that the connection and its SSL object are freed now, not at the next GC
        self._app = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._app_connected:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._app_connected:
            self._app.resume_writing()

    # ------------------------------------------------------------ handshake
    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except Exception as exc:  # SSLError, SSLCertVerificationError, ...
            self._flush()  # the alert, so that the peer learns why (our TCP close follows)
            self._fail_handshake(exc)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._state = _OPEN
        self._app_connected = True
        self._app.connection_made(self)
        if self._write_paused:
            self._app.pause_writing()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        # what came with the peer's last handshake flight (a request after the client's
        # Finished) and what we still have to send (the client's Finished, the server's
        # ticket) are handled once the waiter's task has run: it may refuse the peer
        # (identity, expired resumed session) before any request is read, and its first
        # write takes the Finished along in the same TCP segment
        self._loop.call_soon(self._after_handshake)

    def _after_handshake(self) -> None:
        if self._state != _OPEN:
            return
        if not self._read_paused and (self._in.pending or self._ssl.pending()):
            self._read()
        elif self._out.pending:
            self._flush()

    def _fail_handshake(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._state = _CLOSED
        tcp = self._tcp
        if tcp is not None:
            tcp.close()  # the alert (if any) goes out first

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            exc = ConnectionAbortedError(
                f"SSL handshake is taking longer than {self._timeout} seconds: "
                "aborting the connection"
            )
            waiter = self._waiter
            self._waiter = None
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            self._state = _CLOSED
            if self._tcp is not None:
                self._tcp.abort()

    # ------------------------------------------------------------ records
    def _read(self) -> None:
        """Hand every complete record's plaintext to the application, one record per call."""
        sslobj = self._ssl
        incoming = self._in
        while True:
            try:
                chunk = sslobj.read(RECORD_PLAINTEXT)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still on its way
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as exc:
                self._fatal(exc)
                return
            if not chunk:  # close_notify
                self._peer_closed()
                return
            # (read each time: a sniffing protocol hands the transport over in its first call)
            self._app.data_received(chunk)
            if self._state != _OPEN or self._read_paused:
                break  # the application closed or paused: the rest waits in the BIO
            if not incoming.pending:  # (nothing left inside OpenSSL either: a read of 16 KiB
                break  # takes a whole record's plaintext)
        if self._out.pending and self._state == _OPEN:  # a KeyUpdate answer, a late ticket
            self._flush()

    def _resume(self) -> None:
        if self._state == _OPEN and not self._read_paused:
            self._read()

    def _read_into_void(self) -> None:
        """After our close_notify: discard data, close TCP on the peer's close_notify."""
        try:
            while self._ssl.read(RECORD_PLAINTEXT):
                pass
        except ssl.SSLError:
            return
        tcp = self._tcp
        if tcp is not None:
            tcp.close()

    def _peer_closed(self) -> None:
        """The peer's close_notify: tell the application (eof_received), then answer with ours
        and close (uvloop's SSL transport does not let an application keep the write side
        open either)."""
        self._state = _CLOSING
        if self._app_connected:
            try:
                self._app.eof_received()
            except Exception as exc:  # noqa: BLE001 - reported like uvloop does, then closed
                log.warning("eof_received() failed on a TLS connection: %r", exc)
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._ssl.shutdown()  # queues close_notify in the outgoing BIO
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: the peer's close_notify is not here (and is not awaited)
        self._flush()
        tcp = self._tcp
        if tcp is not None:
            tcp.close()

    def _flush(self) -> None:
        tcp = self._tcp
        if tcp is not None and self._out.pending:
            tcp.write(self._out.read())

    def _fatal(self, exc: BaseException) -> None:
        log.debug("TLS connection failed: %r", exc)
        self._exc = exc
        self._state = _CLOSED
        tcp = self._tcp
        if tcp is not None:
            tcp.abort()

    # ------------------------------------------------------------ application side (transport)
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN:
            return  # closing or closed: dropped, as asyncio transports do after close()
        if not data:
            return
        try:
            self._ssl.write(data)
            self._tcp.write(self._out.read())
        except ssl.SSLError as exc:
            self._fatal(exc)
        except RuntimeError:  # uvloop: the TCP handle closed, connection_lost not yet called
            self._state = _CLOSED

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS 1.3 has no half-close that asyncio's SSL transports offer

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot write EOF")

    def close(self) -> None:
        """close_notify, then close TCP once what was written has left (the peer's
        close_notify is not awaited; OpenSSL keeps the session resumable once ours is sent)."""
        state = self._state
        if state == _OPEN:
            self._state = _CLOSING
            self._shutdown()
        elif state == _HANDSHAKE:
            self.abort()

    def abort(self) -> None:
        self._state = _CLOSED
        tcp = self._tcp
        if tcp is not None:
            tcp.abort()

    def is_closing(self) -> bool:
        return self._state >= _CLOSING

    def pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            if self._state <= _OPEN and self._tcp is not None:
                self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self._state <= _OPEN and self._tcp is not None:
                self._tcp.resume_reading()
                if self._state == _OPEN and (self._in.pending or self._ssl.pending()):
                    self._loop.call_soon(self._resume)  # records read before the pause

    def is_reading(self) -> bool:
        return not self._read_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        if self._tcp is not None:
            limits: tuple[int, int] = self._tcp.get_write_buffer_limits()
            return limits
        return (0, 0)

    def get_write_buffer_size(self) -> int:
        if self._tcp is not None:
            size: int = self._tcp.get_write_buffer_size()
            return size
        return 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> Any:
        return self._app  # None once the connection is lost

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl_object if self._state != _HANDSHAKE else default
        if name == "sslcontext":
            return self._context
        if name == "peercert":  # computed on demand (uvloop decodes it on every handshake)
            return self.ssl_object.getpeercert() if self._state != _HANDSHAKE else default
        if name == "cipher":
            return self.ssl_object.cipher() if self._state != _HANDSHAKE else default
        if name == "compression":
            return self.ssl_object.compression() if self._state != _HANDSHAKE else default
        if name == "tls.record_layer":
            return self
        tcp = self._tcp
        return tcp.get_extra_info(name, default) if tcp is not None else default


def new_tls(
    loop: asyncio.AbstractEventLoop,
    context: ssl.SSLContext,
    app: asyncio.BaseProtocol,
    server_side: bool,
    server_hostname: str | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[TlsTransport, asyncio.Future[None]]:
    """A ``TlsTransport`` for ``app`` on ``context`` and the future of its handshake; give it to
    ``loop.create_connection`` / ``connect_accepted_socket`` as the protocol. The client
    ``SSLObject`` is made here, in the caller's task (``ResumingClientContext.wrap_bio`` reads
    the session offered for it)."""
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side, server_hostname)
    waiter: asyncio.Future[None] = loop.create_future()
    layer = TlsTransport(loop, context, obj, incoming, outgoing, app, waiter, handshake_timeout)
    return layer, waiter

"""Protocol-neutral HTTP events and the codec interfaces (HTTP/1.1 and HTTP/2 implement them).

Contract
--------
A codec is sans-I/O: it never touches a socket or a timer. The connection that owns it feeds
it the bytes it read (``feed``), and writes what ``data_to_send()`` returns. Decoded input
comes out as *events*, delivered as method calls on a *sink* the codec was built with (no
event object is allocated per frame: the HTTP/1.1 hot path stays as cheap as before):

Server side (downstream; ``ServerCodec`` calls a ``ServerSink``)::

    on_request_headers(sid, head)        once per stream, first
    on_request_data(sid, data)           0..n times, in order
    on_request_trailers(sid, trailers)   at most once, after the data
    on_request_end(sid)                  once: the client's end of stream
    on_stream_reset(sid, reason)         instead of / after any of the above; nothing follows

Client side (upstream; ``ClientCodec`` calls a ``ClientSink``)::

    on_response_headers(sid, head)       once, the final (non-1xx) response head
    on_response_data(sid, data)          0..n times
    on_response_trailers(sid, trailers)  at most once
    on_response_end(sid)                 once
    on_stream_reset(sid, reason)         nothing follows for that stream

A client codec's ``sink`` may be replaced while no stream is open on it: a pool that hands
a connection to the next request points the codec at that request's attempt.

Encoding goes the other way: ``send_headers`` / ``send_data`` / ``send_trailers`` /
``send_reset`` append bytes to the codec's output; ``data_to_send()`` drains it (one
``transport.write`` per batch). ``end_stream=True`` on a send closes our side of the stream
(HTTP/1: last chunk or end of the fixed-length body; HTTP/2: END_STREAM flag).

Streams and ids
    Every event carries a stream id ``sid``. HTTP/2 uses the wire's stream ids and may have
    many streams open at once (``multiplexed`` is True, ``max_concurrent_streams`` limits
    them). HTTP/1.1 numbers requests 1, 2, 3... on a connection; pipelined requests are
    decoded in order but answered one at a time. A client codec hands out ids with
    ``new_stream()``.

Heads
    ``RequestHead`` carries the pseudo-header fields (``method``, ``path``, ``authority``,
    ``scheme``) as attributes and the regular headers as a dict of lower-case ``str`` names to
    ``str`` values (repeats joined with ``", "``, ``cookie`` with ``"; "``). ``headers`` never
    holds a pseudo-header; ``headers["host"]`` always equals the authority on decode (an HTTP/2
    codec copies ``:authority`` into it, as Envoy does), and on encode an HTTP/2 codec takes
    ``:authority`` from ``headers["host"]`` (a route may have rewritten it) and drops ``host``.
    ``ResponseHead`` carries ``status`` and the headers either as pairs of ``bytes`` or, from
    an HTTP/1.1 upstream, as the raw header block (hop-by-hop lines removed) so that a
    pass-through response is never split and re-joined; ``pairs()`` / ``block()`` convert on
    demand. Framing is the codec's business alone: a decoded HTTP/1.1 request head still lists
    its connection-level headers (``connection``, ``transfer-encoding``, ``content-length``) as
    received, for the proxy to strip (it removes every hop-by-hop header before forwarding);
    ``chunked`` / ``content_length`` / ``has_body`` say how the body was framed; encoders write
    their own framing and never copy it from a head. A decoded response head has no hop-by-hop
    headers.

Errors
    A malformed stream (one bad request on a multiplexed connection) is reported as
    ``on_stream_reset(sid, ResetReason.PROTOCOL_ERROR)``. A connection-level error makes
    ``feed`` raise ``CodecError`` (status = the HTTP answer when one is still possible); the
    codec has queued whatever goodbye its protocol has (HTTP/2: GOAWAY) in ``data_to_send``.

Flow control
    ``acknowledge(sid, n)``: the consumer has passed on ``n`` bytes of received data (HTTP/2:
    window update; HTTP/1.1: nothing). ``pause_reading(sid)`` / ``resume_reading(sid)``: stop /
    restart accepting data for that stream (HTTP/2: stop crediting its window; HTTP/1.1: a
    no-op, the connection pauses the socket itself). When the peer's window is exhausted the codec keeps
    what ``send_data`` was given and calls ``sink.on_send_blocked(sid)``; it calls
    ``sink.on_send_unblocked(sid)`` once the buffered data has gone out, so the source can be
    paused meanwhile (never buffer without bound). An HTTP/1.1 codec never calls them (the
    transport's ``pause_writing`` does that job).
"""

from __future__ import annotations

import enum
from typing import Protocol

Header = tuple[bytes, bytes]
HeaderList = list[Header]


class CodecError(Exception):
    """Malformed, unsupported or oversized input; ``status`` is the answer to send (400, 413,
    426, 431, 501, 505; 502 on the upstream side)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ResetReason(enum.Enum):
    """Why a stream ended abnormally (Envoy's ``StreamResetReason``)."""

    LOCAL_RESET = "local reset"  # the proxy gave up on the stream (timeout, client left...)
    LOCAL_REFUSED = "local refused stream reset"  # the proxy refused it before any processing
    REMOTE_RESET = "remote reset"  # the peer reset the stream (HTTP/2 RST_STREAM)
    REMOTE_REFUSED = "remote refused stream reset"  # RST_STREAM REFUSED_STREAM: safe to retry
    CONNECTION_FAILURE = "connection failure"  # could not connect
    CONNECTION_TERMINATION = "connection termination"  # the connection closed mid-stream
    OVERFLOW = "overflow"  # a limit (pending requests, concurrent streams) was exceeded
    PROTOCOL_ERROR = "protocol error"  # the peer broke the protocol on this stream


class RequestHead:
    """One request head (see the module docstring). ``path`` is origin-form (``/x?y``).

    The fields after ``scheme`` describe the message, not the request: an HTTP/1.1 codec fills
    them from the wire; an HTTP/2 codec leaves ``keep_alive`` True, sets ``version = "2"`` and
    ``has_body`` from END_STREAM. Defaults live at class level (no ``__slots__``): a decoder
    only sets what a request has, which keeps the per-request cost to one small object.
    """

    method = "GET"
    path = "/"
    authority = ""
    scheme = "http"
    keep_alive = True
    version = "1.1"
    has_body = False
    chunked = False
    content_length: int | None = None
    expect_continue = False
    upgrade = False
    upgrade_to = ""  # "websocket": an HTTP/1.1 Upgrade the proxy tunnels after a 101
    # False: the decoder saw no hop-by-hop header name (connection, te, upgrade, content-length,
    # ...), so the proxy skips looking for them; True (unknown) for any other producer
    hop_by_hop = True

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers: dict[str, str] = {} if headers is None else headers


class ResponseHead:
    """A response head: ``status`` plus headers as ``pairs`` or as an HTTP/1 ``raw`` block.

    ``raw`` is ``b"Name: value\\r\\n...\\r\\n"`` (ends with the empty line, no status line,
    no hop-by-hop lines). Exactly one of ``raw`` / ``headers`` is set on construction.
    ``has_content_length``: the headers carry a content-length (an HTTP/1 server codec then
    keeps it instead of chunking).
    """

    __slots__ = ("_pairs", "has_content_length", "raw", "status")

    def __init__(
        self,
        status: int,
        headers: HeaderList | None = None,
        raw: bytes | None = None,
        has_content_length: bool = False,
    ) -> None:
        self.status = status
        self._pairs = headers
        self.raw = raw
        self.has_content_length = has_content_length

    def pairs(self) -> HeaderList:
        """The headers as ``(name, value)`` pairs (parsed from ``raw`` on first use)."""
        p = self._pairs
        if p is None:
            p = []
            for line in (self.raw or b"").split(b"\r\n"):
                if line:
                    name, _, value = line.partition(b":")
                    p.append((name.strip(), value.strip(b" \t")))
            self._pairs = p
        return p

    def block(self) -> bytes:
        """The headers as an HTTP/1 block (``raw`` when the head came from HTTP/1)."""
        if self.raw is not None:
            return self.raw
        return b"".join([n + b": " + v + b"\r\n" for n, v in self._pairs or ()]) + b"\r\n"

    def set_pairs(self, pairs: HeaderList) -> None:
        """Replace the headers (header operations); drops ``raw``."""
        self._pairs = pairs
        self.raw = None
        self.has_content_length = any(n.lower() == b"content-length" for n, _ in pairs)


# --------------------------------------------------------------------------- sinks (events out)


class ServerSink(Protocol):
    """Receives what a ``ServerCodec`` decoded from a downstream connection."""

    def on_request_headers(self, sid: int, head: RequestHead) -> None: ...
    def on_request_data(self, sid: int, data: bytes) -> None: ...
    def on_request_trailers(self, sid: int, trailers: HeaderList) -> None: ...
    def on_request_end(self, sid: int) -> None: ...
    def on_stream_reset(self, sid: int, reason: ResetReason) -> None: ...
    def on_send_blocked(self, sid: int) -> None: ...
    def on_send_unblocked(self, sid: int) -> None: ...


class ClientSink(Protocol):
    """Receives what a ``ClientCodec`` decoded from an upstream connection."""

    def on_response_headers(self, sid: int, head: ResponseHead) -> None: ...
    def on_response_data(self, sid: int, data: bytes) -> None: ...
    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None: ...
    def on_response_end(self, sid: int) -> None: ...
    def on_stream_reset(self, sid: int, reason: ResetReason) -> None: ...
    def on_send_blocked(self, sid: int) -> None: ...
    def on_send_unblocked(self, sid: int) -> None: ...


class ClientSinkBase:
    """A ``ClientSink`` as a class: the upstream attempt
    (``proxy.http.upstream_request.UpstreamRequest``) subclasses it. Compiled, a codec that
    finds its sink is one (``isinstance``) calls it natively instead of through a generic
    method call on the Protocol (issue 11, `lean`); any other sink (a mirror copy, a test's
    recorder) still satisfies the ``ClientSink`` Protocol and is called the generic way."""

    def on_response_headers(self, sid: int, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_response_data(self, sid: int, data: bytes) -> None:
        raise NotImplementedError

    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None:
        raise NotImplementedError

    def on_response_end(self, sid: int) -> None:
        raise NotImplementedError

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        raise NotImplementedError

    def on_send_blocked(self, sid: int) -> None:
        raise NotImplementedError

    def on_send_unblocked(self, sid: int) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- codecs


class _Codec(Protocol):
    protocol: str  # "HTTP/1.1" or "HTTP/2" (access log %PROTOCOL%)
    multiplexed: bool  # True: several streams at once (HTTP/2)

    def feed(self, data: bytes) -> None:
        """Decode ``data``; events go to the sink. Raises ``CodecError`` (connection-level)."""
        ...

    def eof(self) -> None:
        """The peer closed its side; ends a close-delimited body or resets open streams."""
        ...

    def data_to_send(self) -> bytes:
        """Drain the encoded output (``b""`` when nothing is pending)."""
        ...

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None: ...
    def send_trailers(self, sid: int, trailers: HeaderList) -> None:
        """Trailers end our side of the stream (HTTP/1.1: sent only when chunked)."""
        ...

    def send_reset(self, sid: int, reason: ResetReason) -> None:
        """Abort the stream (HTTP/2: RST_STREAM; HTTP/1.1: the connection must be closed)."""
        ...

    def acknowledge(self, sid: int, n: int) -> None: ...
    def pause_reading(self, sid: int) -> None: ...
    def resume_reading(self, sid: int) -> None: ...


class ServerCodec(_Codec, Protocol):
    """Downstream side: requests in, responses out."""

    def send_headers(self, sid: int, head: ResponseHead, end_stream: bool = False) -> None: ...
    def send_continue(self, sid: int) -> None:
        """``100 Continue`` for a request that expects it."""
        ...

    def drain(self) -> None:
        """Take no new streams: HTTP/1.1 answers the request in flight with
        ``connection: close``; HTTP/2 sends GOAWAY and lets open streams finish."""
        ...

    @property
    def reusable(self) -> bool:
        """False once the connection must close after the streams in flight."""
        ...


class ClientCodec(_Codec, Protocol):
    """Upstream side: requests out, responses in."""

    max_concurrent_streams: int  # 1 for HTTP/1.1; the peer's SETTINGS value for HTTP/2
    # False: no further stream may start on this connection (HTTP/1.1 "Connection: close" or a
    # close-delimited body; HTTP/2 GOAWAY received); the pool closes it when it is idle
    keep_alive: bool

    def new_stream(self) -> int:
        """A stream id for the next request (HTTP/1.1: only when no stream is open)."""
        ...

    def send_headers(self, sid: int, head: RequestHead, end_stream: bool = False) -> None:
        """Encode ``head`` as it stands (the router has already rewritten path and headers).
        HTTP/1.1 frames the body with ``content-length`` when ``head.content_length`` is set,
        else chunked unless ``end_stream``; a ``HEAD`` request expects a body-less answer."""
        ...

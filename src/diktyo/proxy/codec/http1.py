"""HTTP/1.1 codec on httptools (llhttp, C): request decoding, response decoding, head encoding.

Theory of operation
-------------------
Sans-I/O: a decoder is fed bytes and calls methods on a *sink*; nothing here touches a socket.

- ``RequestDecoder(sink)``: downstream side. ``feed(data)`` calls ``sink.on_request_head(head)``,
  ``sink.on_request_body(chunk)`` and ``sink.on_request_end()`` for every request found in
  ``data`` (pipelined requests arrive in order; the sink queues them). Malformed input raises
  ``CodecError(status, message)`` (400, 426, 431, 501, 505); the connection is unusable
  afterwards.
- ``ResponseDecoder(sink)``: upstream side. ``sink.on_response_head(status, header_block, ka)``,
  ``on_response_body(chunk)``, ``on_response_end()``. Call ``expect_no_body()`` before feeding
  the response to a HEAD request; ``eof()`` ends a close-delimited body.
- Encoders build one ``bytes`` per head with the framing the proxy chose (hop-by-hop headers
  removed, ``Transfer-Encoding`` re-framed).
- ``Http1ServerCodec`` / ``Http1ClientCodec`` wrap the decoders and encoders behind the
  protocol-neutral interfaces of ``codec.events`` (stream ids, ``ServerSink`` /
  ``ClientSink`` events, ``send_headers`` / ``send_data`` / ``send_trailers``,
  ``data_to_send``). They are the only place that writes HTTP/1 framing: status lines,
  chunking and the last chunk, ``100 Continue``, ``connection: close`` / ``keep-alive``,
  request framing and the HEAD rule. The proxy uses only these.

Request headers are kept as a dict of lower-case ``str`` names to ``str`` values (duplicates
joined with ``, ``; ``cookie`` with ``; ``): routing, load balancing and header operations all
read it. Response headers stay raw bytes: the header block is cut from the received data and
forwarded after one regex removes hop-by-hop lines (``set-cookie`` may repeat; nothing is
decoded per header on the hot path).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, Protocol

import httptools

from diktyo.proxy.codec.events import (
    ClientCodec,
    ClientSink,
    ClientSinkBase,
    CodecError,
    HeaderList,
    RequestHead,
    ResetReason,
    ResponseHead,
    ServerCodec,
    ServerSink,
)

if TYPE_CHECKING:
    from diktyo.proxy.http.connection_manager import HttpConnection

__all__ = ["CodecError", "RequestHead"]  # defined in events (protocol-neutral), re-exported

# Final (here and below): compiled, a constant is inlined and a container is a C static, where
# a plain module global costs a dictionary lookup per use (issue 11, `sat`: ~45 lookups per
# request across the hot path). Globals that tests replace with monkeypatch stay plain (the
# regexes used on a cache miss); the two caches are Final and tests empty them in place.
MAX_HEADER_BYTES: Final = 60 * 1024
MAX_HEADER_COUNT: Final = 100

# request headers the proxy never forwards (hop-by-hop, RFC 9110 7.6.1, plus proxy-connection)
HOP_BY_HOP_STR: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)
HOP_BY_HOP_BYTES: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

REASONS: dict[int, bytes] = {
    100: b"Continue",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    418: b"I'm a teapot",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))
    return line


class RequestSink(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_body(self, chunk: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class ResponseSink(Protocol):
    def on_response_head(self, status: int, header_block: bytes, keep_alive: bool) -> None: ...
    def on_response_body(self, chunk: bytes) -> None: ...
    def on_response_end(self) -> None: ...


# a character outside RFC 3986's authority set (unreserved, sub-delims, ":", "@", "[", "]",
# pct-encoded): "Host: a b" and the like are answered 400, never routed or forwarded
_BAD_AUTHORITY = re.compile(r"[^A-Za-z0-9\-._~%!$&'()*+,;=:@\[\]]").search
# authorities that passed _BAD_AUTHORITY (clients repeat theirs: a set lookup instead of a
# regex search per request); bounded, cleared when full
_GOOD_AUTHORITIES: Final[set[str]] = set()
GOOD_AUTHORITIES_MAX: Final = 1024

# raw header name -> lower-case str (names repeat: decode and lower each only once)
_NAMES: Final[dict[bytes, str]] = {}
_FRAMING: Final = frozenset({"content-length", "transfer-encoding"})
_IDLE_HEADERS: Final[dict[str, str]] = {}  # between requests (never written: a head starts a new dict)


class _Stop(Exception):
    """Raised inside a callback to stop the C parser (limits, HEAD responses)."""


class RequestDecoder:
    """Downstream HTTP/1.1 request decoder (see module docstring)."""

    __slots__ = (
        "_cl_seen",
        "_data",
        "_error",
        "_hbytes",
        "_hcount",
        "_head",
        "_headers",
        "_hop",
        "_in_message",
        "_parser",
        "_te_seen",
        "_url",
        "accept_http_10",
        "begun",
        "in_head",
        "sink",
        "tunnel",
    )

    def __init__(self, sink: RequestSink, accept_http_10: bool = True) -> None:
        self.sink = sink
        self.tunnel = False  # after a WebSocket upgrade request: the bytes that follow are raw
        # False: an HTTP/1.0 request is answered 426, as Envoy does without accept_http_10
        self.accept_http_10 = accept_http_10
        self._parser = httptools.HttpRequestParser(self)
        self._error: CodecError | None = None
        self._in_message = False
        # the read being decoded while a request head begins at its first byte (see feed)
        self._data = b""
        # header timeout bookkeeping: ``begun`` counts request heads started, ``in_head`` is
        # True from a head's first byte until it is complete
        self.begun = 0
        self.in_head = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._hbytes = 0
        self._hcount = 0
        self._cl_seen = False
        self._te_seen = False
        self._hop = False  # a hop-by-hop (or framing) header name was seen
        self._head: RequestHead | None = None

    @property
    def in_message(self) -> bool:
        """True between the first byte of a request and its end (for header/idle timeouts)."""
        return self._in_message

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self.in_head = True
        self.begun += 1
        # _reset_message() inlined: one Python call less per request
        self._url = b""
        self._headers = {}
        self._hbytes = 0
        self._hcount = 0
        self._cl_seen = False
        self._te_seen = False
        self._hop = False
        self._head = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._hbytes += len(url)
        if self._hbytes > MAX_HEADER_BYTES:
            self._error = CodecError(431, "request headers too large")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hbytes = hb = self._hbytes + len(name) + len(value) + 4
        self._hcount = hc = self._hcount + 1
        if hb > MAX_HEADER_BYTES or hc > MAX_HEADER_COUNT:
            self._error = CodecError(431, "request headers too large")
            raise _Stop
        key = _NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_NAMES) < 4096:
                _NAMES[name] = key
        val = value.decode("latin-1")
        if key in HOP_BY_HOP_STR:  # noted for prepare_headers; the framing headers too
            self._hop = True
            if key in _FRAMING:
                val = val.strip(" \t")
                if key == "content-length":
                    if self._cl_seen:
                        self._error = CodecError(400, "duplicate content-length")
                        raise _Stop
                    if not val.isdigit() or not val.isascii():
                        self._error = CodecError(400, "invalid content-length")
                        raise _Stop
                    self._cl_seen = True
                else:
                    self._te_seen = True
                if self._cl_seen and self._te_seen:
                    self._error = CodecError(400, "both content-length and transfer-encoding")
                    raise _Stop
        headers = self._headers
        n = len(headers)
        old = headers.setdefault(key, val)  # one dict operation for a new name (the usual)
        if len(headers) != n:
            pass
        elif key == "host":
            self._error = CodecError(400, "multiple host headers")
            raise _Stop
        elif key == "cookie":
            headers[key] = old + "; " + val
        else:
            headers[key] = old + ", " + val

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self._parser
        headers = self._headers
        head = RequestHead(headers)
        if not self._hop:
            head.hop_by_hop = False
        method = parser.get_method()
        head.method = method.decode("ascii", "replace")
        url = self._url
        # The version: a request line that began at the start of this read is there as
        # received (method SP url SP version CRLF, llhttp's strict grammar), so "HTTP/1.1" is a
        # slice compare; else httptools' get_http_version(), which formats "major.minor" (~2,300
        # instructions per request compiled; issue 11, `sat`)
        d = self._data
        v11 = False
        if d:
            self._data = b""
            off = 0
            n = len(d)
            while off < n and (d[off] == 13 or d[off] == 10):  # llhttp skips empty lines
                off += 1
            p = off + len(method) + 1 + len(url)
            v11 = d[p : p + 11] == b" HTTP/1.1\r\n"
        version = "1.1" if v11 else parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                self._error = CodecError(505, f"HTTP/{version} is not supported")
                raise _Stop
            if not self.accept_http_10:
                self._error = CodecError(426, "HTTP/1.0 is not accepted: use HTTP/1.1")
                raise _Stop
            head.version = version
        if not parser.should_keep_alive():
            head.keep_alive = False
        if not url:
            self._error = CodecError(400, "empty request target")
            raise _Stop
        if url[0:1] == b"/":
            path = url.decode("latin-1")
            authority = headers.get("host", "")
        elif url == b"*":
            path = "*"
            authority = headers.get("host", "")
        else:
            # absolute-form (proxy mode) or authority-form (CONNECT)
            try:
                # Any: httptools' stub says bytes/int where absent parts are None, and
                # compiled (mypyc) code would trust the stub
                parsed: Any = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._error = CodecError(400, "invalid request target")
                raise _Stop from None
            if parsed.schema:
                head.scheme = parsed.schema.decode("latin-1").lower()
            host = (parsed.host or b"").decode("latin-1")
            authority = host if parsed.port is None else f"{host}:{parsed.port}"
            path = (parsed.path or b"/").decode("latin-1")
            if parsed.query:
                path += "?" + parsed.query.decode("latin-1")
            if not authority:
                self._error = CodecError(400, "invalid request target")
                raise _Stop
            headers["host"] = authority
        if "host" not in headers:  # HTTP/1.0 too: a request is never forwarded without Host
            self._error = CodecError(400, "missing host header")
            raise _Stop
        if authority not in _GOOD_AUTHORITIES:
            if _BAD_AUTHORITY(authority) is not None:
                self._error = CodecError(400, "invalid host header")
                raise _Stop
            if len(_GOOD_AUTHORITIES) >= GOOD_AUTHORITIES_MAX:
                _GOOD_AUTHORITIES.clear()
            _GOOD_AUTHORITIES.add(authority)
        head.path = path
        head.authority = authority
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                # gzip, chunked / deflate / identity...: Envoy and nginx answer 501 rather
                # than forward a body whose coding they would silently drop
                self._error = CodecError(501, f"unsupported transfer-encoding {te!r}")
                raise _Stop
            head.chunked = True
            head.has_body = True
        else:
            cl = headers.get("content-length")
            if cl is not None:
                n = int(cl)
                head.content_length = n
                head.has_body = n > 0
        exp = headers.get("expect")
        if exp is not None and exp.lower() == "100-continue":
            head.expect_continue = True
        if "upgrade" in headers:
            head.upgrade = True
            up = headers["upgrade"].strip().lower()
            if up == "websocket" and "upgrade" in headers.get("connection", "").lower():
                head.upgrade_to = up
        self._head = head
        sink = self.sink
        if isinstance(sink, Http1ServerCodec):  # the usual sink: compiled, a native call
            sink.on_request_head(head)
        else:
            sink.on_request_head(head)

    def on_body(self, body: bytes) -> None:
        self.sink.on_request_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        # an idle keep-alive connection keeps nothing of its last request (issue 11, RSS):
        # the stream owns the head; an upgrade's head is still needed by feed()
        self._headers = _IDLE_HEADERS
        if self._head is not None and not self._head.upgrade_to:
            self._head = None
        self.sink.on_request_end()

    # -- feeding
    def feed(self, data: bytes) -> None:
        if self.tunnel:
            self.sink.on_request_body(data)  # WebSocket: raw bytes after the upgrade request
            return
        err = self._error  # a local: a narrowed self._error would be trusted by mypyc
        if err is not None:
            raise err
        # between requests, the next request's head begins at this read's first byte (after
        # any empty lines): on_headers_complete reads the version from it; dropped at the end
        # of the read (an idle connection keeps no read)
        self._data = b"" if self._in_message else data
        try:
            self._parser.feed_data(data)
            self._data = b""
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            rest = data[offset:]
            head = self._head
            if head is not None and head.upgrade_to:
                # WebSocket: what follows the request head is the tunnel's first bytes
                self.tunnel = True
                if rest:
                    self.sink.on_request_body(rest)
                return
            # other upgrades are not supported: the request was handled as a plain request
            # (the Upgrade header is stripped); go on parsing what follows with a new parser
            self._parser = httptools.HttpRequestParser(self)
            if rest:
                self.feed(rest)
        except httptools.HttpParserCallbackError as exc:
            if self._error is not None:
                raise self._error from None
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, CodecError):
                self._error = cause
                raise cause from None
            raise
        except httptools.HttpParserError as exc:
            if self._error is None:
                msg = str(exc) or "malformed request"
                self._error = CodecError(400, f"malformed request: {msg}")
            raise self._error from None


class ResponseDecoder:
    """Upstream HTTP/1.1 response decoder (see module docstring).

    Header lines are not decoded one callback at a time: the sink gets the raw header block
    (``b"Name: value\\r\\n...\\r\\n"``, status line excluded) cut from the received bytes,
    which the proxy forwards after removing hop-by-hop lines with one regex. ``parse_header_block``
    turns it into pairs when a header operation needs them.
    """

    __slots__ = (
        "_carry",
        "_close_delimited",
        "_data",
        "_head_start",
        "_in_body",
        "_in_head",
        "_no_body",
        "_parser",
        "_pos",
        "_started",
        "_status",
        "sink",
        "upgrade_ok",
        "upgraded",
    )

    def __init__(self, sink: ResponseSink) -> None:
        self.sink = sink
        self.upgrade_ok = False  # the request asked for a WebSocket upgrade: 101 is expected
        self.upgraded = False  # a 101 came: the bytes that follow are the tunnel's
        self._parser = httptools.HttpResponseParser(self)
        self._no_body = False
        self._data = b""
        self._pos = 0
        self._carry = b""
        self._head_start = 0
        self._in_head = False
        self._status = 0
        self._in_body = False
        self._close_delimited = False
        self._started = False

    def expect_no_body(self) -> None:
        """The next response answers a HEAD request: its head is the whole message."""
        self._no_body = True

    @property
    def started(self) -> bool:
        """True once any byte of the current response was decoded."""
        return self._started

    def on_message_begin(self) -> None:
        self._started = True
        self._in_head = True
        self._head_start = self._pos
        self._carry = b""
        self._in_body = False
        self._close_delimited = False

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        self._status = status
        # cut the raw head out of what was received
        carry = self._carry
        if carry:
            buf = carry + self._data[self._head_start :]
            lead = 0
        else:  # the whole head is in this read: cut it from it, no copy
            buf = self._data
            lead = self._head_start
        start = lead
        # llhttp skips empty lines before a status line; so must the cut (found by fuzzing:
        # b"\r\nHTTP/1.1 200 OK..." forwarded the status line as a header)
        n = len(buf)
        while lead < n and buf[lead] in (13, 10):  # CR, LF (an int test: no slice per line)
            lead += 1
        # the status line: usually this status's own ("HTTP/1.1 200 OK\r\n"), found by one
        # slice compare instead of a search (bytes.find costs ~1,000 instructions compiled,
        # mostly the generic method call; issue 11, `sat`)
        line = STATUS_LINES.get(status)
        if line is not None and buf[lead : lead + len(line)] == line:
            first = lead + len(line) - 2
        else:
            first = buf.find(b"\r\n", lead)
        end = buf.find(b"\r\n\r\n", first) if first >= 0 else -1
        if end < 0:
            raise CodecError(502, "malformed upstream response head")
        if end - start > MAX_HEADER_BYTES:
            # Envoy's max_response_headers_kb defaults to 60: 502, flag UPE
            raise CodecError(502, "upstream response headers too large")
        if status == 101 and not self.upgrade_ok:
            # only a WebSocket upgrade request may be answered 101
            raise CodecError(502, "unexpected 101 Switching Protocols from upstream")
        block = buf[first + 2 : end + 4]
        self._pos = end + 4 if not carry else end + 4 - len(carry) + self._head_start
        self._carry = b""
        self._in_head = False
        if status == 101:
            self.upgraded = True
            self._in_body = True
            self._close_delimited = True  # the tunnel ends with the connection
            self.sink.on_response_head(101, block, False)
            raise _Stop
        if 100 <= status < 200 and status != 101:
            return  # interim response: swallowed (the proxy answers 100-continue itself)
        ka = parser.should_keep_alive()
        no_body = self._no_body or status == 204 or status == 304
        if not no_body and not (_BLOCK_CACHE.get(block) or _block_facts(block))[2]:
            self._close_delimited = True
            ka = False
        self._in_body = True
        sink = self.sink
        if isinstance(sink, Http1ClientCodec):  # the usual sink: compiled, a native call
            sink.on_response_head(status, block, ka)
        else:
            sink.on_response_head(status, block, ka)
        if self._no_body:
            self._no_body = False
            self._in_body = False
            self._started = False
            self.sink.on_response_end()
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200 and self._status != 101:
            self._started = False
            return
        self._in_body = False
        self._started = False
        self.sink.on_response_end()

    def feed(self, data: bytes) -> None:
        if self.upgraded:
            self.sink.on_response_body(data)  # WebSocket tunnel: raw bytes
            return
        self._data = data
        self._pos = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, _Stop):
                self._parser = httptools.HttpResponseParser(self)
                self._in_head = False
                self._after_upgrade(data)
                return
            if isinstance(cause, CodecError):
                raise cause from None
            raise
        except httptools.HttpParserError as exc:
            raise CodecError(502, f"malformed upstream response: {exc}") from None
        if self._in_head:  # the head continues in the next read
            self._carry += data[self._head_start :]
            self._head_start = 0
            if len(self._carry) > MAX_HEADER_BYTES:
                raise CodecError(502, "upstream response headers too large")

    def _after_upgrade(self, data: bytes) -> bool:
        """After a 101 (set by ``on_headers_complete`` during ``feed``): the rest of ``data``
        is the WebSocket tunnel's first bytes."""
        if not self.upgraded:
            return False
        rest = data[self._pos :]
        if rest:
            self.sink.on_response_body(rest)
        return True

    def eof(self) -> bool:
        """The upstream closed. Returns True if that ended a close-delimited body."""
        if self._in_body and self._close_delimited:
            self._in_body = False
            self._started = False
            self.sink.on_response_end()
            return True
        return False


_FRAMED_RE = re.compile(
    rb"^(?:content-length|transfer-encoding)[ \t]*:", re.IGNORECASE | re.MULTILINE
)
# hop-by-hop response header lines (RFC 9110 7.6.1), removed before forwarding
HOP_BY_HOP_LINE_RE = re.compile(
    rb"^(?:connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade)"
    rb"[ \t]*:[^\r\n]*\r\n",
    re.IGNORECASE | re.MULTILINE,
)
CONTENT_LENGTH_RE = re.compile(rb"^content-length[ \t]*:", re.IGNORECASE | re.MULTILINE)

# The same patterns for the hot path, searched in ``b"\n" + block``: the literal "\n" prefix
# lets sre jump from line start to line start, where MULTILINE "^" tries every byte (~4x
# slower: the three searches took ~6 us per response, now ~1.5 us).
_FRAMED_NL_RE = re.compile(rb"\n(?:content-length|transfer-encoding)[ \t]*:", re.IGNORECASE)
_HOP_BY_HOP_NL_RE = re.compile(
    rb"\n(?:connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade)"
    rb"[ \t]*:[^\r\n]*\r(?=\n)",
    re.IGNORECASE,
)
_CONTENT_LENGTH_NL_RE = re.compile(rb"\ncontent-length[ \t]*:", re.IGNORECASE)


def _block_facts(block: bytes) -> tuple[bytes, bool, bool]:
    nb = b"\n" + block
    stripped = _HOP_BY_HOP_NL_RE.sub(b"", nb)
    facts = (
        stripped[1:],
        _CONTENT_LENGTH_NL_RE.search(stripped) is not None,
        _FRAMED_NL_RE.search(nb) is not None,
    )
    if len(block) <= BLOCK_CACHE_ENTRY_MAX:
        if len(_BLOCK_CACHE) >= BLOCK_CACHE_SIZE:
            _BLOCK_CACHE.clear()
        _BLOCK_CACHE[block] = facts
    return facts


# Response header blocks seen recently -> (block without hop-by-hop lines, has content-length,
# has content-length or transfer-encoding). An upstream sends the same head again and again
# (nginx's changes with its Date header once a second), so each response costs one dict
# lookup instead of three regex passes (~2 us). Bounded: blocks up to 1 KiB, 256 of them
# (cleared when full: a changing header only costs the lookup).
BLOCK_CACHE_SIZE: Final = 256
BLOCK_CACHE_ENTRY_MAX: Final = 1024
_BLOCK_CACHE: Final[dict[bytes, tuple[bytes, bool, bool]]] = {}


def response_block_facts(block: bytes) -> tuple[bytes, bool, bool]:
    """``(block without hop-by-hop lines, has content-length, is framed)`` for a response
    header block (see ``strip_hop_by_hop``; framed: a content-length or transfer-encoding)."""
    return _BLOCK_CACHE.get(block) or _block_facts(block)


def strip_hop_by_hop(block: bytes) -> tuple[bytes, bool]:
    """A response header block without its hop-by-hop lines (same result as
    ``HOP_BY_HOP_LINE_RE.sub(b"", block)``), and whether it has a ``content-length`` line."""
    facts = _BLOCK_CACHE.get(block) or _block_facts(block)
    return facts[0], facts[1]


def parse_header_block(block: bytes) -> list[tuple[bytes, bytes]]:
    """``b"A: 1\\r\\nB: 2\\r\\n\\r\\n"`` -> ``[(b"A", b"1"), (b"B", b"2")]``."""
    out = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b":")
        out.append((name.strip(), value.strip(b" \t")))
    return out


def encode_header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([n + b": " + v + b"\r\n" for n, v in headers]) + b"\r\n"


# --------------------------------------------------------------------------- encoders

_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


def encode_request_head(
    method: str, path: str, headers: dict[str, str], body_framing: bytes
) -> bytes:
    """Request line + headers (hop-by-hop already removed by the caller) + framing header."""
    # one list, one join, one encode: compiled, the loop is native (no tuple and join call
    # per header as with map(": ".join, items)): timeit 1.96 -> 1.66 us for 7 headers. (An
    # f-string per line, one CPyStr_Build each, cost more: ~700 against ~500 instructions
    # per header; issue 11, `sat`.)
    parts = [method, " ", path, " HTTP/1.1\r\n"]
    for k, v in headers.items():
        parts.append(k)
        parts.append(": ")
        parts.append(v)
        parts.append("\r\n")
    if body_framing:
        return "".join(parts).encode("latin-1") + body_framing + _CRLF
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def content_length_header(n: int) -> bytes:
    return b"content-length: %d\r\n" % n


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def encode_response_head(status: int, headers: list[tuple[bytes, bytes]], extra: bytes) -> bytes:
    """Status line + forwarded headers + ``extra`` (already CRLF-terminated lines)."""
    parts = [status_line(status)]
    for name, value in headers:
        parts.append(name + b": " + value + _CRLF)
    parts.append(extra)
    parts.append(_CRLF)
    return b"".join(parts)


def local_response(
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
    content_type: bytes = b"text/plain",
) -> bytes:
    """A complete response generated by the proxy itself (errors, redirects, direct responses)."""
    parts = [status_line(status)]
    if headers:
        for name, value in headers:
            parts.append(name + b": " + value + _CRLF)
    if body:
        parts.append(b"content-type: " + content_type + _CRLF)
    parts.append(b"content-length: %d\r\n" % len(body))
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(_CRLF)
    parts.append(body)
    return b"".join(parts)


# --------------------------------------------------------------------------- codecs (events.py)

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE_HDR: Final = b"connection: close\r\n"
_KEEP_ALIVE_HDR: Final = b"connection: keep-alive\r\n"


class _ServerRequestDecoder(RequestDecoder):
    """The server codec's decoder: a body chunk and the end of a request go straight to the
    codec's sink as events (one Python call each instead of two); the rest is
    ``RequestDecoder``'s."""

    __slots__ = ("codec",)

    def __init__(self, codec: Http1ServerCodec, accept_http_10: bool = True) -> None:
        super().__init__(codec, accept_http_10)
        self.codec = codec

    def on_body(self, body: bytes) -> None:
        c = self.codec  # Http1ServerCodec.on_request_body, inlined
        h1 = c.h1
        if h1 is not None:  # compiled: a native call
            h1.on_request_data(c._sid, body)
        else:
            c.sink.on_request_data(c._sid, body)

    def on_message_complete(self) -> None:
        self._in_message = False
        c = self.codec  # Http1ServerCodec.on_request_end, inlined
        h1 = c.h1
        if h1 is not None:  # compiled: a native call
            h1.on_request_end(c._sid)
        else:
            c.sink.on_request_end(c._sid)


class _ClientResponseDecoder(ResponseDecoder):
    """The client codec's decoder: body chunks and the end of a response go straight to the
    codec's (current) sink as events; the rest is ``ResponseDecoder``'s."""

    __slots__ = ("codec",)

    def __init__(self, codec: Http1ClientCodec) -> None:
        super().__init__(codec)
        self.codec = codec

    def on_body(self, body: bytes) -> None:
        c = self.codec  # Http1ClientCodec.on_response_body, inlined
        sink = c.sink
        if isinstance(sink, ClientSinkBase):  # the upstream attempt: compiled, a native call
            sink.on_response_data(c._sid, body)
        else:
            sink.on_response_data(c._sid, body)

    def on_message_complete(self) -> None:
        # ResponseDecoder.on_message_complete with Http1ClientCodec.on_response_end inlined
        status = self._status
        if 100 <= status < 200 and status != 101:
            self._started = False
            return
        self._in_body = False
        self._started = False
        c = self.codec
        sink = c.sink
        if isinstance(sink, ClientSinkBase):  # the upstream attempt: compiled, a native call
            sink.on_response_end(c._sid)
        else:
            sink.on_response_end(c._sid)


class Http1ServerCodec:
    """``events.ServerCodec`` for HTTP/1.1: requests in (``RequestDecoder``), responses out.

    Requests are numbered 1, 2, 3... (pipelined requests are decoded in order; the connection
    answers them one at a time, in order). The response framing is chosen here alone: the
    upstream's ``content-length`` is kept, else HTTP/1.1 responses are chunked and HTTP/1.0
    ones close-delimited; ``HEAD``, 204 and 304 carry no body; ``connection: close`` goes out
    when the request asked for it, the response is close-delimited or ``drain()`` was called
    (then ``reusable`` turns False once the response is written).
    """

    protocol = "HTTP/1.1"
    multiplexed = False

    __slots__ = (
        "_chunked",
        "_no_body",
        "_requests",
        "_sid",
        "closing",
        "decoder",
        "feed",
        "h1",
        "out",
        "sink",
    )

    def __init__(self, sink: ServerSink, accept_http_10: bool = True) -> None:
        self.sink = sink
        # the sink when it is the HTTP/1.1 connection (it sets this): compiled, its event
        # methods are then native calls instead of generic ones through ServerSink (issue 11)
        self.h1: HttpConnection | None = None
        self.decoder = _ServerRequestDecoder(self, accept_http_10=accept_http_10)
        # feed(data) decodes (events go to the sink; CodecError on malformed input): the
        # decoder's own method, so a read costs no extra call
        self.feed = self.decoder.feed
        self._sid = 0
        self._requests: dict[int, RequestHead] = {}  # sid -> head, until its response is sent
        # encoded, not yet taken by data_to_send() (HttpConnection.flush reads it directly)
        self.out: list[bytes] = []
        self._chunked = False
        self._no_body = False
        self.closing = False  # a response went out with connection: close (= not reusable)

    # -- RequestDecoder sink -> events
    def on_request_head(self, head: RequestHead) -> None:
        self._sid = sid = self._sid + 1
        self._requests[sid] = head
        h1 = self.h1
        if h1 is not None:  # compiled: a native call
            h1.on_request_headers(sid, head)
        else:
            self.sink.on_request_headers(sid, head)

    def on_request_body(self, chunk: bytes) -> None:
        self.sink.on_request_data(self._sid, chunk)

    def on_request_end(self) -> None:
        self.sink.on_request_end(self._sid)

    # -- input
    def eof(self) -> None:
        pass  # a request cut short is reported by the connection (the client went away)

    @property
    def heads_begun(self) -> int:
        """How many request heads began (header-timeout bookkeeping)."""
        return self.decoder.begun

    @property
    def in_head(self) -> bool:
        """True from a request head's first byte until it is complete."""
        return self.decoder.in_head

    @property
    def reusable(self) -> bool:
        """False once a response went out with ``connection: close``."""
        return not self.closing

    def drain(self) -> None:
        """Answer the request in flight with ``connection: close``, then stop."""
        self.closing = True

    # -- output
    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        self.out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def send_continue(self, sid: int) -> None:
        self.out.append(_CONTINUE)

    def send_headers(self, sid: int, head: ResponseHead, end_stream: bool = False) -> None:
        req = self._requests.get(sid) or _NO_REQUEST
        status = head.status
        extra = b""
        self._chunked = False
        self._no_body = no_body = req.method == "HEAD"
        if status == 101:
            # WebSocket: the upstream's Upgrade/Connection headers go out as they came; raw
            # bytes follow, and the connection closes when the tunnel does
            self.closing = True
            block = head.raw if head.raw is not None else head.block()
            self.out.append(b"HTTP/1.1 101 Switching Protocols\r\n")
            self.out.append(block)
            if end_stream:
                self._end(sid)
            return
        if no_body or status == 204 or status == 304 or head.has_content_length:
            pass
        elif req.version == "1.1":
            extra = _CHUNKED
            self._chunked = True
        else:
            self.closing = True  # HTTP/1.0 without a length: the body ends with the connection
        if self.closing or not req.keep_alive:
            self.closing = True
            extra += _CLOSE_HDR
        elif req.version == "1.0":
            extra += _KEEP_ALIVE_HDR  # HTTP/1.0 keep-alive must be confirmed
        raw = head.raw
        block = raw if raw is not None else head.block()
        line = STATUS_LINES.get(status) or status_line(status)
        # block ends with the empty line: extra headers go before it
        self.out.append(line + block[:-2] + extra + _CRLF if extra else line + block)
        if end_stream:
            self._end(sid)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        if data and not self._no_body:
            if self._chunked:
                self.out.append(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.out.append(data)
        if end_stream:  # _end(sid) inlined (hot path)
            if self._chunked:
                self._chunked = False
                if not self._no_body:
                    self.out.append(LAST_CHUNK)
            self._requests.pop(sid, None)

    def send_trailers(self, sid: int, trailers: HeaderList) -> None:
        if self._chunked and not self._no_body:
            self._chunked = False
            self.out.append(b"0\r\n" + encode_header_block(trailers))
        self._end(sid)

    def _end(self, sid: int) -> None:
        if self._chunked:
            self._chunked = False
            if not self._no_body:
                self.out.append(LAST_CHUNK)
        self._requests.pop(sid, None)

    def send_reset(self, sid: int, reason: ResetReason) -> None:
        # HTTP/1.1 has no stream reset: the connection must be aborted by its owner
        self.closing = True
        self._requests.pop(sid, None)

    def send_error(self, status: int, message: str) -> None:
        """A connection-level error answer (malformed request, header timeout), then close."""
        self.closing = True
        self.out.append(local_response(status, message.encode(), close=True))

    # -- flow control: HTTP/1.1 relies on the transport (pause_reading on the socket)
    def acknowledge(self, sid: int, n: int) -> None:
        pass

    def pause_reading(self, sid: int) -> None:
        pass

    def resume_reading(self, sid: int) -> None:
        pass


_NO_REQUEST: Final = RequestHead()


class Http1ClientCodec:
    """``events.ClientCodec`` for HTTP/1.1: requests out, responses in (``ResponseDecoder``).

    One stream at a time. The request body is framed with the head's ``content-length``, else
    chunked when it has one; response heads come out as ``ResponseHead`` with the raw header
    block (hop-by-hop lines removed). ``keep_alive`` says whether the connection may carry
    another request after the response.
    """

    protocol = "HTTP/1.1"
    multiplexed = False
    max_concurrent_streams = 1

    __slots__ = ("_chunked", "_sid", "decoder", "feed", "keep_alive", "out", "sink")

    def __init__(self, sink: ClientSink) -> None:
        self.sink = sink
        self.decoder = _ClientResponseDecoder(self)
        self.feed = self.decoder.feed  # (see Http1ServerCodec.feed)
        self._sid = 0
        self.out: list[bytes] = []  # encoded, not yet taken by data_to_send()
        self._chunked = False
        self.keep_alive = True

    def new_stream(self) -> int:
        self._sid += 1
        return self._sid

    # -- ResponseDecoder sink -> events
    def on_response_head(self, status: int, block: bytes, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        if status == 101:  # WebSocket: Upgrade/Connection go back to the client as they came
            self.sink.on_response_headers(self._sid, ResponseHead(101, None, block, False))
            return
        facts = _BLOCK_CACHE.get(block) or _block_facts(block)  # (strip_hop_by_hop, cached)
        head = ResponseHead(status, None, facts[0], facts[1])
        sink = self.sink
        if isinstance(sink, ClientSinkBase):  # the upstream attempt: compiled, a native call
            sink.on_response_headers(self._sid, head)
        else:
            sink.on_response_headers(self._sid, head)

    def on_response_body(self, chunk: bytes) -> None:
        self.sink.on_response_data(self._sid, chunk)

    def on_response_end(self) -> None:
        self.sink.on_response_end(self._sid)

    # -- input
    def eof(self) -> None:
        self.decoder.eof()

    @property
    def started(self) -> bool:
        """True once a byte of the current response was decoded."""
        return self.decoder.started

    # -- output
    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        self.out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def send_headers(self, sid: int, head: RequestHead, end_stream: bool = False) -> None:
        if head.chunked or (head.has_body and head.content_length is None):
            framing = _CHUNKED
            self._chunked = True
        else:
            self._chunked = False
            cl = head.content_length
            framing = b"" if cl is None else b"content-length: %d\r\n" % cl
        if head.method == "HEAD":
            self.decoder.expect_no_body()
        if head.upgrade_to:
            # WebSocket: the stream removed hop-by-hop headers; the upgrade goes on upstream
            self.decoder.upgrade_ok = True
            framing = b"connection: upgrade\r\nupgrade: " + head.upgrade_to.encode() + b"\r\n"
        self.out.append(encode_request_head(head.method, head.path, head.headers, framing))
        if end_stream and self._chunked:
            self._chunked = False
            self.out.append(LAST_CHUNK)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        if self._chunked:
            if data:
                self.out.append(b"%x\r\n%s\r\n" % (len(data), data))
            if end_stream:
                self._chunked = False
                self.out.append(LAST_CHUNK)
        elif data:
            self.out.append(data)

    def send_trailers(self, sid: int, trailers: HeaderList) -> None:
        if self._chunked:
            self._chunked = False
            self.out.append(b"0\r\n" + encode_header_block(trailers))

    def send_reset(self, sid: int, reason: ResetReason) -> None:
        self.keep_alive = False  # HTTP/1.1: the owner closes the connection

    def acknowledge(self, sid: int, n: int) -> None:
        pass

    def pause_reading(self, sid: int) -> None:
        pass

    def resume_reading(self, sid: int) -> None:
        pass


if TYPE_CHECKING:  # the type checker proves both codecs implement the neutral interfaces

    def _conforms(s: ServerSink, c: ClientSink) -> tuple[ServerCodec, ClientCodec]:
        return Http1ServerCodec(s), Http1ClientCodec(c)

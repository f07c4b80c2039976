"""gRPC over HTTP/2, the parts a proxy needs: status codes, grpc-timeout, local replies, messages.

Sans-I/O helpers used by the stream and its filters; nothing here touches a socket.

- ``is_grpc(content_type)``: a gRPC request (``application/grpc`` and ``application/grpc+proto``
  etc.; gRPC-Web is ``application/grpc-web...``, reported by ``is_grpc_web``).
- ``grpc_timeout(value)``: the ``grpc-timeout`` header (``1S``, ``250m``, ``2H`` ...) in seconds,
  None when absent or malformed (the gRPC wire spec: at most 8 digits and one unit letter).
- ``effective_timeout(route_timeout, header)``: Istio's rule. Istio sets Envoy's
  ``max_grpc_timeout`` to the route's timeout (0 when the route has none), so a ``grpc-timeout``
  header always applies, capped by a configured route timeout.
- ``http_to_grpc_status`` / ``grpc_to_http_status``: Envoy's mappings (for replies the proxy
  makes itself and for ``fault.abort.grpcStatus`` towards non-gRPC clients).
- ``local_reply(grpc_status, message)``: a *trailers-only* gRPC response as Envoy sends it for
  its own replies: HTTP 200, ``content-type: application/grpc``, ``grpc-status``,
  ``grpc-message`` percent-encoded, and no body.
- ``MessageCounter``: counts length-prefixed gRPC messages in a DATA stream (bytes may split a
  message or its 5-byte prefix anywhere); feeds ``istio_request_messages_total`` /
  ``istio_response_messages_total``.
"""

from __future__ import annotations

from diktyo.core.grpc_status import HTTP_STATUS, STATUS_CODES, parse_status
from diktyo.proxy.codec.events import HeaderList

__all__ = ["STATUS_CODES", "parse_status"]

STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}

UNAVAILABLE = 14
DEADLINE_EXCEEDED = 4

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def is_grpc(content_type: str | None) -> bool:
    """``application/grpc`` or ``application/grpc+<codec>`` (Envoy's ``isGrpcRequestHeaders``)."""
    if not content_type or not content_type.startswith("application/grpc"):
        return False
    rest = content_type[16:]
    return not rest or rest[0] in "+;"


def is_grpc_web(content_type: str | None) -> bool:
    return content_type is not None and content_type.startswith("application/grpc-web")


def grpc_timeout(value: str | None) -> float | None:
    """Seconds from a ``grpc-timeout`` header; None when absent or malformed."""
    if not value:
        return None
    v = value.strip()
    digits, unit = v[:-1], v[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def encode_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value for ``seconds`` (milliseconds, rounded up; at most 8 digits)."""
    ms = max(1, int(seconds * 1000 + 0.999))
    if ms < 100_000_000:
        return f"{ms}m"
    return f"{min(99_999_999, int(seconds + 0.999))}S"


def effective_timeout(route_timeout: float | None, header: str | None) -> float | None:
    """The timeout of a gRPC request as Istio configures Envoy: ``grpc-timeout`` when present,
    capped by the route's timeout if it has one (None/0 = no route timeout)."""
    g = grpc_timeout(header)
    if g is None:
        return route_timeout
    if route_timeout:
        return min(g, route_timeout)
    return g


def http_to_grpc_status(status: int) -> int:
    """Envoy's ``Grpc::Utility::httpToGrpcStatus``."""
    if status == 400:
        return 13  # INTERNAL
    if status == 401:
        return 16  # UNAUTHENTICATED
    if status == 403:
        return 7  # PERMISSION_DENIED
    if status == 404:
        return 12  # UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return 14  # UNAVAILABLE
    return 2  # UNKNOWN


def grpc_to_http_status(code: int) -> int:
    """Envoy's ``Grpc::Utility::grpcToHttpStatus`` (the HTTP status for a non-gRPC client)."""
    return HTTP_STATUS.get(code, 500)


def _pct(message: str) -> bytes:
    """grpc-message percent-encoding: printable ASCII except '%' stays, the rest %XX (UTF-8)."""
    out = bytearray()
    for b in message.encode():
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def decode_message(value: bytes) -> str:
    """Undo ``grpc-message`` percent-encoding (lenient: bad escapes stay as they are)."""
    out = bytearray()
    i = 0
    while i < len(value):
        c = value[i]
        if c == 0x25 and i + 2 < len(value):
            try:
                out.append(int(value[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return out.decode("utf-8", "replace")


def local_reply(grpc_status: int, message: str) -> HeaderList:
    """Headers of a trailers-only gRPC reply (send with HTTP status 200 and END_STREAM)."""
    return [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(grpc_status).encode()),
        (b"grpc-message", _pct(message)),
    ]


def status_of(headers: HeaderList | None, trailers: HeaderList | None) -> str:
    """The ``grpc-status`` of a response (trailers, else trailers-only headers), '' if none."""
    for block in (trailers, headers):
        if block:
            for n, v in block:
                if n == b"grpc-status":
                    return v.decode("latin-1").strip()
    return ""


class MessageCounter:
    """Counts gRPC length-prefixed messages in a byte stream (5-byte prefix: flag, length)."""

    __slots__ = ("_need", "_prefix", "count")

    def __init__(self) -> None:
        self.count = 0
        self._prefix = bytearray()  # a prefix split across DATA frames
        self._need = 0  # body bytes of the current message still to come

    def feed(self, data: bytes) -> int:
        """Account ``data``; returns how many messages it started."""
        started = 0
        i, n = 0, len(data)
        while i < n:
            if self._need:
                take = min(self._need, n - i)
                self._need -= take
                i += take
                continue
            want = 5 - len(self._prefix)
            chunk = data[i : i + want]
            self._prefix += chunk
            i += len(chunk)
            if len(self._prefix) == 5:
                self._need = int.from_bytes(self._prefix[1:5], "big")
                self._prefix.clear()
                self.count += 1
                started += 1
        return started

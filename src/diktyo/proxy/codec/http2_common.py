"""What both HTTP/2 codecs share (`h2`-based ``http2.py`` and libnghttp2-based
``http2_nghttp2.py``): Envoy's limits, the ``http2.*`` counters, the preface and the
connection-specific header names. Imports nothing heavy, so choosing a codec costs nothing."""

from __future__ import annotations

from dataclasses import dataclass

from diktyo.proxy.codec.events import HeaderList, RequestHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an h2c (prior knowledge) client sends first

# connection-specific headers (RFC 9113 8.2.2): never sent on HTTP/2
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)
_HOP_BY_HOP_STR = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "te",
        "expect",
        "http2-settings",
    }
)


@dataclass(frozen=True, slots=True)
class Http2Options:
    """Limits, named and defaulted as Envoy's ``http2_protocol_options`` (and its overload
    runtime keys). Window sizes and the stream limit follow Envoy's edge best practice (64 KiB,
    1 MiB, 100 streams) instead of its 256 MiB / 2^31-1 defaults: a sidecar in Python must not
    let one peer make it buffer 256 MiB."""

    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 65_536
    initial_connection_window_size: int = 1_048_576
    max_header_list_bytes: int = 60 * 1024  # max_request_headers_kb: 60
    max_headers_count: int = 100
    max_outbound_control_frames: int = 1000
    max_consecutive_inbound_frames_with_empty_payload: int = 1
    max_inbound_priority_frames_per_stream: int = 100
    max_inbound_window_update_frames_per_data_frame_sent: int = 10
    premature_reset_total_stream_count: int = 500
    premature_reset_min_stream_lifetime: float = 1.0


DEFAULT_OPTIONS = Http2Options()


@dataclass(slots=True)
class Http2Stats:
    """Envoy's ``http2.*`` codec counters (one object may be shared by every connection)."""

    rx_reset: int = 0
    tx_reset: int = 0
    goaway_sent: int = 0
    header_overflow: int = 0
    rx_messaging_error: int = 0
    streams_refused: int = 0  # beyond max_concurrent_streams
    outbound_control_flood: int = 0
    inbound_empty_frames_flood: int = 0
    inbound_priority_frames_flood: int = 0
    inbound_window_update_frames_flood: int = 0
    premature_resets: int = 0
    rapid_reset_goaway: int = 0
    continuation_flood: int = 0
    trailers: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"http2.{k}": getattr(self, k) for k in self.__dataclass_fields__}


class NghttpUnavailable(RuntimeError):
    """libnghttp2 (Debian ``libnghttp2-14``) or cffi is missing or too old (raised by
    ``http2_nghttp2.py``; defined here because mypyc compiles that module and cannot compile
    a ``RuntimeError`` subclass)."""


def lower_pairs(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v) for n, v in pairs if n.lower() not in _HOP_BY_HOP]


_lower = lower_pairs


def request_header_list(head: RequestHead) -> HeaderList:
    """The HTTP/2 header list of an upstream request (both codecs): pseudo-headers first,
    hop-by-hop headers dropped except ``te: trailers``, cookies split into crumbs (RFC 9113
    8.2.3), ``content-length`` from the head when it has one."""
    hdrs = head.headers
    authority = hdrs.get("host") or head.authority
    pairs: HeaderList = [
        (b":method", head.method.encode("latin-1")),
        (b":scheme", head.scheme.encode("latin-1")),
        (b":authority", authority.encode("latin-1")),
        (b":path", head.path.encode("latin-1")),
    ]
    has_te = False
    for name, value in hdrs.items():
        if name in _HOP_BY_HOP_STR:
            if name == "te" and value.strip().lower() == "trailers":
                pairs.append((b"te", b"trailers"))
                has_te = True
            continue
        n = name.lower().encode("latin-1")
        if name == "cookie":
            pairs.extend((n, c.strip().encode("latin-1")) for c in value.split(";"))
        else:
            pairs.append((n, value.encode("latin-1")))
    if not has_te and hdrs.get("content-type", "").startswith("application/grpc"):
        # gRPC servers require "te: trailers"; the stream strips TE as hop-by-hop (Envoy
        # keeps "te: trailers"), so a gRPC request gets it back here
        pairs.append((b"te", b"trailers"))
    if head.content_length is not None and "content-length" not in hdrs:
        pairs.append((b"content-length", str(head.content_length).encode()))
    return pairs


def request_header_block(head: RequestHead) -> tuple[bytes, int]:
    """``request_header_list(head)`` as one ``name\\0value\\0...`` block and its field count
    (libnghttp2's compiled extension takes that form): the same fields in the same order, with
    one encode for the whole block instead of two per field."""
    hdrs = head.headers
    authority = hdrs.get("host") or head.authority
    parts = [":method", head.method, ":scheme", head.scheme, ":authority", authority,
             ":path", head.path]  # fmt: skip
    has_te = False
    for name, value in hdrs.items():
        if name in _HOP_BY_HOP_STR:
            if name == "te" and value.strip().lower() == "trailers":
                parts += ("te", "trailers")
                has_te = True
            continue
        if name == "cookie":
            for c in value.split(";"):
                parts += ("cookie", c.strip())
        else:
            parts += (name.lower(), value)
    if not has_te and hdrs.get("content-type", "").startswith("application/grpc"):
        parts += ("te", "trailers")
    if head.content_length is not None and "content-length" not in hdrs:
        parts += ("content-length", str(head.content_length))
    parts.append("")
    return "\0".join(parts).encode("latin-1"), (len(parts) - 1) // 2

"""HTTP/2 header lists and blocks of the messages diktyo sends (both codecs), compiled with the
hot path (``_build.py`` HOT_PATH): the upstream request head as a list (`h2`) or as one
``name\\0value\\0...`` block (libnghttp2's compiled extension), the response head as a block, and
the lower-casing / hop-by-hop filter of forwarded fields. ``http2_common`` re-exports them.

Built per request, so every helper here builds its result in one pass without intermediate
lists of pairs (docs/performance.md, "HTTP/2 per-request CPU, stop 20")."""

from __future__ import annotations

from typing import Final

from diktyo.proxy.codec.events import HeaderList, RequestHead

# connection-specific headers (RFC 9113 8.2.2): never sent on HTTP/2
_HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)
_HOP_BY_HOP_STR: Final = frozenset(
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

# the status codes' ":status\0NNN\0" prefixes, built once
_STATUS_PREFIX: Final = {s: b":status\0" + str(s).encode() + b"\0" for s in range(100, 600)}


def lower_pairs(pairs: HeaderList) -> HeaderList:
    """``pairs`` with lower-case names, the connection-specific fields left out."""
    out: HeaderList = []
    for n, v in pairs:
        ln = n.lower()
        if ln not in _HOP_BY_HOP:
            out.append((ln, v))
    return out


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
                parts.append("te")
                parts.append("trailers")
                has_te = True
            continue
        if name == "cookie":
            for c in value.split(";"):
                parts.append("cookie")
                parts.append(c.strip())
        else:
            parts.append(name.lower())
            parts.append(value)
    if not has_te and hdrs.get("content-type", "").startswith("application/grpc"):
        parts.append("te")
        parts.append("trailers")
    if head.content_length is not None and "content-length" not in hdrs:
        parts.append("content-length")
        parts.append(str(head.content_length))
    parts.append("")
    return "\0".join(parts).encode("latin-1"), (len(parts) - 1) // 2


def response_header_block(status: int, pairs: HeaderList) -> tuple[bytes, int]:
    """A response head as one ``name\\0value\\0...`` block (``:status`` first, then
    ``lower_pairs(pairs)``) and its field count."""
    prefix = _STATUS_PREFIX.get(status)
    if prefix is None:
        prefix = b":status\0" + str(status).encode() + b"\0"
    parts: list[bytes] = []
    for name, value in pairs:
        ln = name.lower()
        if ln not in _HOP_BY_HOP:
            parts.append(ln)
            parts.append(value)
    if not parts:
        return prefix, 1
    parts.append(b"")
    return prefix + b"\0".join(parts), 1 + (len(parts) - 1) // 2

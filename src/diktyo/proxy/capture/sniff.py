"""Protocol sniffing on the first bytes of a connection, as Envoy's inspectors do for Istio.

``detect(prefix)`` is pure. It answers as soon as the bytes decide, and ``None`` while more
bytes are needed:

- ``"http2"``: the HTTP/2 client connection preface ``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``;
- ``"http1"``: an HTTP/1.x request line ``METHOD SP target SP HTTP/1.x CRLF`` (Envoy's
  http_inspector parses the first line; any RFC 7230 token is accepted as method);
- ``"tls"``: a TLS handshake record carrying a ClientHello (content type 22, version 3.x,
  handshake type 1), as the tls_inspector;
- ``"tcp"``: anything else.

Istio treats sniffed HTTP/1.1 and HTTP/2 as HTTP and everything else (TLS included, on a
port without a declared protocol) as TCP.
"""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_SNIFF = 8192  # the request line must fit (Envoy's http_inspector reads up to 64 KiB)

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _http1(prefix: bytes) -> str | None:
    sp = -1
    for i, b in enumerate(prefix):
        if b == 0x20:
            sp = i
            break
        if b not in _TCHAR:
            return "tcp"
    if sp < 0:
        return None if len(prefix) < MAX_SNIFF else "tcp"
    if sp == 0:
        return "tcp"
    eol = prefix.find(b"\r\n", sp + 1)
    if eol < 0:
        bad = any(b < 0x21 and b != 0x20 for b in prefix[sp + 1 :])
        if bad or len(prefix) >= MAX_SNIFF:
            return "tcp"
        return None
    line = prefix[sp + 1 : eol]
    parts = line.rsplit(b" ", 1)
    if len(parts) != 2 or not parts[0]:
        return "tcp"
    version = parts[1]
    if version in (b"HTTP/1.1", b"HTTP/1.0"):
        return "http1"
    return "tcp"


def detect(prefix: bytes) -> str | None:
    """``"http1"``, ``"http2"``, ``"tls"`` or ``"tcp"``; ``None`` = not decided, read more."""
    if not prefix:
        return None
    if prefix[0] == 0x16:  # TLS handshake record
        if len(prefix) < 6:
            return None
        if prefix[1] == 3 and prefix[5] == 1:
            return "tls"
        return "tcp"
    n = min(len(prefix), len(H2_PREFACE))
    if prefix[:n] == H2_PREFACE[:n]:
        if n == len(H2_PREFACE):
            return "http2"
        # "PRI * HTTP/2.0" is also an HTTP/1 request line prefix: wait for the preface
        return None
    return _http1(prefix)


def is_http(kind: str) -> bool:
    return kind in ("http1", "http2")

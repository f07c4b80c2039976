"""A minimal HTTP/1.1 client for the sidecar's few control calls (JWKS fetch, CA requests).

One request per connection (``Connection: close``), bounded response size, a timeout for the
whole exchange; ``http://`` and ``https://`` (with the given or default SSL context).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_RESPONSE = 4 * 1024 * 1024


class HttpClientError(OSError):
    """The request could not be made or the response could not be read."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while True:
        eol = data.find(b"\r\n", i)
        if eol < 0:
            raise HttpClientError("truncated chunked body")
        size = int(data[i:eol].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2 : eol + 2 + size]
        i = eol + 2 + size + 2


async def request(
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpClientError(f"unsupported URL {url!r}: use http:// or https://")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tls: ssl.SSLContext | None = None
    if parts.scheme == "https":
        tls = ssl_context or ssl.create_default_context()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                parts.hostname, port, ssl=tls, server_hostname=parts.hostname if tls else None
            )
            try:
                writer.write(head + body)
                await writer.drain()
                raw = await reader.read(MAX_RESPONSE + 1)
                buf = bytearray(raw)
                while raw and len(buf) <= MAX_RESPONSE:
                    raw = await reader.read(65536)
                    buf += raw
            finally:
                writer.close()
    except TimeoutError:
        raise HttpClientError(f"{method} {url}: no response within {timeout} s") from None
    except (OSError, ssl.SSLError) as exc:
        raise HttpClientError(f"{method} {url}: {exc}") from None
    if len(buf) > MAX_RESPONSE:
        raise HttpClientError(f"{method} {url}: response larger than {MAX_RESPONSE} bytes")
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        raise HttpClientError(f"{method} {url}: malformed response")
    status_line, *hdr_lines = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise HttpClientError(f"{method} {url}: malformed status line {status_line!r}") from None
    hdrs: dict[str, str] = {}
    for line in hdr_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    data = bytes(buf[head_end + 4 :])
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        data = _dechunk(data)
    elif "content-length" in hdrs:
        data = data[: int(hdrs["content-length"])]
    return Response(status, hdrs, data)


async def fetch_jwks(uri: str, timeout: float = 5.0) -> bytes:
    """A ``Fetcher`` for ``JwtAuthenticator``: GET ``uri``, 200 required."""
    resp = await request("GET", uri, timeout=timeout)
    if resp.status != 200:
        raise HttpClientError(f"GET {uri}: HTTP {resp.status}")
    return resp.body

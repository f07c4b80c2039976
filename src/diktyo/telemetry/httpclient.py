"""A minimal asyncio HTTP/1.1 client for the sidecar's own telemetry calls (OTLP span posts).

One request per connection (``Connection: close``), bounded time and body size. Kept here so
the sidecar does not load an HTTP client library (aiohttp) for its telemetry; the control
plane's calls (scrapes, Prometheus queries) go through aiohttp, the control side's client.
Issue 13 wants the sidecar's one internal client built on its own HTTP/1 codec: this should
move onto ``proxy/codec`` once the rebuilt codec (issue 9) has a client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

MAX_BODY = 16 * 1024 * 1024


class HttpError(OSError):
    """The peer answered something that is not HTTP/1.x, or too much of it."""


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readline()
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return bytes(out)
        if len(out) + size > limit:
            raise HttpError(f"response body larger than {limit} bytes")
        out += await reader.readexactly(size)
        await reader.readexactly(2)


async def request(
    method: str,
    url: str,
    body: bytes = b"",
    content_type: str | None = None,
    timeout: float = 5.0,
    max_body: int = MAX_BODY,
) -> tuple[int, bytes]:
    """Send one request; returns (status, body). Raises OSError / TimeoutError / ValueError."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"URL {url!r} must look like http://host:port/path")
    port = u.port or (443 if u.scheme == "https" else 80)
    ctx = ssl.create_default_context() if u.scheme == "https" else None
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(u.hostname, port, ssl=ctx)
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
                    "User-Agent: diktyo-telemetry"]  # fmt: skip
            if body or method in ("POST", "PUT"):
                head.append(f"Content-Length: {len(body)}")
            if content_type:
                head.append(f"Content-Type: {content_type}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split()
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise HttpError(f"bad HTTP status line from {url}: {status_line[:80]!r}")
            status = int(parts[1])
            length: int | None = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if method == "HEAD" or status in (204, 304):
                return status, b""
            if chunked:
                return status, await _read_chunked(reader, max_body)
            if length is not None:
                if length > max_body:
                    raise HttpError(f"response body of {length} bytes exceeds {max_body}")
                return status, await reader.readexactly(length)
            data = await reader.read(max_body + 1)
            if len(data) > max_body:
                raise HttpError(f"response body exceeds {max_body} bytes")
            return status, data
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.wait_for(go(), timeout)

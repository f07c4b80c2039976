"""HTTP/1.1 keep-alive client connections for the load generator (the only socket code here).

A ``Target`` is the URL plus where to connect: straight to the URL's host, or to the HTTP proxy
from ``HTTP_PROXY``/``http_proxy`` (the sidecar) unless ``NO_PROXY`` matches the host. Through
a proxy the request line carries the absolute URL, as curl and aiohttp send it. The request
bytes are built once; responses are parsed by httptools.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

USER_AGENT = "diktyo-load/0.1"


class TargetError(ValueError):
    """A URL, header or proxy setting the load generator cannot use; says how to fix it."""


def parse_header(text: str) -> tuple[str, str]:
    """``"end-user: jason"`` -> ``("end-user", "jason")``."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n"):
        raise TargetError(f"header {text!r} is not 'Name: value' (e.g. -H 'end-user: jason')")
    return name, value.strip()


def proxy_for(host: str, env: Mapping[str, str]) -> str | None:
    """The HTTP proxy URL to use for ``host`` per env (lower-case names win), or None."""
    proxy = (
        env.get("http_proxy")
        or env.get("HTTP_PROXY")
        or env.get("all_proxy")
        or env.get("ALL_PROXY")
    )
    if not proxy:
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if no_proxy and bypass(host, {"no": no_proxy}):
        return None
    return proxy


def _split_host_port(url: str, what: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise TargetError(
            f"{what} {url!r} is not http://; diktyo load speaks plain HTTP/1.1 "
            "(the sidecar originates TLS when a DestinationRule asks for it)"
        )
    if not parts.hostname:
        raise TargetError(f"{what} {url!r} has no host; use e.g. http://httpbin:8000/get")
    try:
        port = parts.port or 80
    except ValueError:
        raise TargetError(f"{what} {url!r} has an invalid port") from None
    return parts.hostname, port


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    connect_host: str
    connect_port: int
    proxy: str | None
    request: bytes

    @classmethod
    def build(
        cls,
        url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        env: Mapping[str, str] | None = None,
        method: str = "GET",
    ) -> Target:
        """Where to connect and what to send; ``env=None`` means no proxy."""
        host, port = _split_host_port(url, "URL")
        parts = urlsplit(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        authority = host if port == 80 else f"{host}:{port}"
        if ":" in host:  # IPv6 literal
            authority = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        proxy = proxy_for(host, env) if env is not None else None
        if proxy is not None:
            connect_host, connect_port = _split_host_port(proxy, "HTTP_PROXY")
            request_target = f"http://{authority}{path}"
        else:
            connect_host, connect_port = host, port
            request_target = path
        given = {name.lower() for name, _ in headers}
        lines = [f"{method} {request_target} HTTP/1.1"]
        if "host" not in given:
            lines.append(f"Host: {authority}")
        if "user-agent" not in given:
            lines.append(f"User-Agent: {USER_AGENT}")
        if "accept" not in given:
            lines.append("Accept: */*")
        lines.extend(f"{name}: {value}" for name, value in headers)
        try:
            request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise TargetError("URL and headers must be ASCII/latin-1 text") from None
        return cls(url, connect_host, connect_port, proxy, request)


class ResponseError(Exception):
    """No usable HTTP response: the message is the error kind shown in the report."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``await request()`` sends the prepared request once."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._headers_done = False
        self._length_known = False
        self.closed = False
        self.keep_alive = True

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("malformed response")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._headers_done and not self._length_known:
                # body delimited by the end of the connection: that end completes it
                waiter.set_result(self._parser.get_status_code())
            else:
                waiter.set_exception(
                    ResponseError("connection reset" if exc is not None else "connection closed")
                )

    # --- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length" or (
            lname == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._length_known = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    # --- use
    def _fail(self, kind: str) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ResponseError(kind))

    async def request(self, timeout: float) -> int:
        """Send the request and return the response's status code.

        Raises ResponseError (kind in the message) or TimeoutError.
        """
        if self.closed or self._transport is None:
            raise ResponseError("connection closed")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._headers_done = False
        self._length_known = False
        self._transport.write(self._request)
        try:
            async with asyncio.timeout(timeout):
                status = await waiter
        finally:
            self._waiter = None
        if status is None:
            raise ResponseError("malformed response")
        return int(status)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True


async def connect(target: Target, timeout: float) -> Connection:
    """A new connection to ``target``; raises ResponseError or TimeoutError."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: Connection(target.request), target.connect_host, target.connect_port
            )
    except ConnectionRefusedError:
        raise ResponseError("connection refused") from None
    except OSError as exc:
        raise ResponseError(f"connect failed: {exc.strerror or exc}") from None
    return conn

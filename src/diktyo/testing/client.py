"""A small keep-alive HTTP/1.1 test client over asyncio streams (parses with the proxy's codec)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Self

from diktyo.proxy.codec.http1 import ResponseDecoder, parse_header_block


@dataclass
class ClientResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Sink:
    def __init__(self) -> None:
        self.done: list[ClientResponse] = []
        self.cur: ClientResponse | None = None
        self.parts: list[bytes] = []

    def on_response_head(self, status: int, block: bytes, ka: bool) -> None:
        self.cur = ClientResponse(
            status,
            [
                (k.decode("latin-1").lower(), v.decode("latin-1"))
                for k, v in parse_header_block(block)
            ],
        )
        self.parts = []

    def on_response_body(self, chunk: bytes) -> None:
        self.parts.append(chunk)

    def on_response_end(self) -> None:
        assert self.cur is not None
        self.cur.body = b"".join(self.parts)
        self.done.append(self.cur)
        self.cur = None


class HttpClient:
    """``async with HttpClient(port) as c: r = await c.get("http://reviews/x")``."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.port = port
        self.host = host
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sink = _Sink()
        self.decoder = ResponseDecoder(self.sink)

    async def connect(self) -> Self:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.sink = _Sink()
        self.decoder = ResponseDecoder(self.sink)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.writer = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_raw(self, data: bytes) -> None:
        if self.writer is None:
            await self.connect()
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, head: bool = False) -> ClientResponse:
        """Read one response; raises ConnectionError if the connection closes first."""
        assert self.reader is not None
        if head:
            self.decoder.expect_no_body()

        async def read() -> ClientResponse:
            assert self.reader is not None
            while not self.sink.done:
                data = await self.reader.read(65536)
                if not data:
                    if self.decoder.eof() and self.sink.done:
                        break
                    raise ConnectionError("connection closed before a complete response")
                self.decoder.feed(data)
            return self.sink.done.pop(0)

        return await asyncio.wait_for(read(), self.timeout)

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> ClientResponse:
        """``url`` absolute (``http://reviews/x``, proxy form) or origin-form with a Host header."""
        headers = dict(headers or {})
        if url.startswith("http://") and not any(k.lower() == "host" for k in headers):
            rest = url[7:]
            headers["Host"] = rest.split("/", 1)[0]
        if body or method in ("POST", "PUT", "PATCH"):
            headers.setdefault("Content-Length", str(len(body)))
        lines = [f"{method} {url} HTTP/1.1\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        lines.append("\r\n")
        await self.send_raw("".join(lines).encode("latin-1") + body)
        return await self.read_response(head=method == "HEAD")

    async def get(self, url: str, headers: dict[str, str] | None = None) -> ClientResponse:
        return await self.request("GET", url, headers)


async def http_request(
    port: int,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> ClientResponse:
    """One request on a fresh connection."""
    async with HttpClient(port, timeout=timeout) as c:
        return await c.request(method, url, headers, body)

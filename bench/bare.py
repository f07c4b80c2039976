"""The floor of diktyo's stack: a bare uvloop + httptools HTTP/1.1 forwarding loop.

No routing, no stats, no headers added or removed, no timeouts: each downstream connection gets
one upstream keep-alive connection of its own (opened when it is accepted); each request is
parsed with httptools, its head re-encoded from the parsed parts and written in one write with
its body; each response is parsed, re-encoded and written the same way. That is the work any
proxy on uvloop + httptools has to do per request, so the gap between this loop and HAProxy is
the stack's (uvloop's transports, httptools' callbacks, the syscalls), and the gap between
diktyo and this loop is diktyo's own per-request work.

    python bench/bare.py --port P --upstream-port U

``bench/run.py --targets bare`` starts it pinned like the other proxies. Bodies are forwarded
with their Content-Length, or re-chunked when the message was chunked (enough for the bench's
traffic; not a proxy for anything else).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

import httptools
import uvloop


class _Side(asyncio.Protocol):
    """Shared by both directions: collect one message's head and body, hand it on complete."""

    parser: Any

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        self.out += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.out.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def take(self) -> bytes:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
            self.chunked = False
        data = b"".join(self.out)
        self.out.clear()
        return data

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()


class Upstream(_Side):
    def __init__(self, down: Downstream) -> None:
        super().__init__()
        self.down = down
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_message_begin(self) -> None:
        self.out.append(b"")  # slot for the status line, filled in on_headers_complete

    def on_headers_complete(self) -> None:
        self.out[0] = b"HTTP/1.1 %d %s\r\n" % (self.parser.get_status_code(), self.reason)
        self.out.append(b"\r\n")

    def on_message_complete(self) -> None:
        transport = self.down.transport
        if transport is not None:
            transport.write(self.take())


class Downstream(_Side):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.up: Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.upstream_port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.up = up
        if self.pending and up.transport is not None:
            up.transport.write(b"".join(self.pending))
            self.pending.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()

    def on_url(self, url: bytes) -> None:
        self.out += (self.parser.get_method(), b" ", url, b"")  # last: the version, set below

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        self.out[3] = b" HTTP/1.0\r\n" if version == "1.0" else b" HTTP/1.1\r\n"
        self.out.append(b"\r\n")

    def on_message_complete(self) -> None:
        data = self.take()
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            self.pending.append(data)


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(lambda: Downstream(upstream_port), sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    ap.add_argument("--upstream-port", type=int, required=True, help="forward to 127.0.0.1:PORT")
    args = ap.parse_args(argv)
    uvloop.run(serve(args.port, args.upstream_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

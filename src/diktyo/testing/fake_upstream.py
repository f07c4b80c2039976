"""FakeUpstream: a real HTTP/1.1 server on 127.0.0.1 that records requests and answers as programmed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from diktyo.proxy.codec.http1 import CodecError, RequestDecoder, RequestHead, status_line


@dataclass
class Response:
    """What the fake answers. ``close_without_response`` drops the connection instead."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0
    close_without_response: bool = False
    chunked: bool = False
    chunks: list[bytes] | None = None  # chunked body pieces (default: body in one chunk)
    close_after: bool = False  # send "connection: close" and close after answering


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    conn_id: int = 0
    conn_seq: int = 0  # 1 for the first request on its connection
    received_at: float = 0.0
    first_body_at: float | None = None


Handler = Callable[[RecordedRequest], Response]


class _Conn(asyncio.Protocol):
    def __init__(self, up: FakeUpstream, cid: int) -> None:
        self.up = up
        self.cid = cid
        self.decoder = RequestDecoder(self)
        self.transport: asyncio.Transport | None = None
        self.req: RecordedRequest | None = None
        self.body: list[bytes] = []
        self.seq = 0
        self.queue: list[RecordedRequest] = []
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.up.connections += 1
        self.up.open_conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.open_conns.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
        except CodecError as exc:
            self.up.errors.append(exc.message)
            if self.transport is not None:
                self.transport.close()

    def on_request_head(self, head: RequestHead) -> None:
        self.seq += 1
        self.req = RecordedRequest(
            head.method,
            head.path,
            dict(head.headers),
            conn_id=self.cid,
            conn_seq=self.seq,
            received_at=time.monotonic(),
        )
        self.body = []
        if head.expect_continue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_request_body(self, chunk: bytes) -> None:
        assert self.req is not None
        if self.req.first_body_at is None:
            self.req.first_body_at = time.monotonic()
            self.up.first_body.set()
        self.body.append(chunk)
        self.up.body_bytes += len(chunk)

    def on_request_end(self) -> None:
        req = self.req
        assert req is not None
        req.body = b"".join(self.body) if self.up.keep_bodies else b""
        self.up.requests.append(req)
        self.queue.append(req)
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if not self.queue or self.transport is None:
            self.busy = False
            return
        self.busy = True
        req = self.queue.pop(0)
        resp = self.up.handler(req)
        if resp.delay > 0:
            asyncio.get_running_loop().call_later(resp.delay, self._answer, req, resp)
        else:
            self._answer(req, resp)

    def _answer(self, req: RecordedRequest, resp: Response) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if resp.close_without_response:
            t.close()
            return
        parts = [status_line(resp.status)]
        hdrs = dict(resp.headers)
        body = resp.body
        if resp.chunked:
            hdrs.setdefault("transfer-encoding", "chunked")
        elif resp.status not in (204, 304):
            hdrs.setdefault("content-length", str(len(body)))
        if resp.close_after:
            hdrs["connection"] = "close"
        for k, v in hdrs.items():
            parts.append(f"{k}: {v}\r\n".encode("latin-1"))
        parts.append(b"\r\n")
        if req.method != "HEAD":
            if resp.chunked:
                for c in resp.chunks if resp.chunks is not None else [body]:
                    if c:
                        parts.append(b"%x\r\n%s\r\n" % (len(c), c))
                parts.append(b"0\r\n\r\n")
            else:
                parts.append(body)
        t.write(b"".join(parts))
        if resp.close_after:
            t.close()
            return
        self._next()


class FakeUpstream:
    """``async with FakeUpstream() as up:`` -> ``up.port``; ``up.requests`` records what arrived.

    Program it with ``up.respond(Response(...))`` (every request) or ``up.handler = fn``.
    """

    def __init__(
        self,
        response: Response | None = None,
        handler: Handler | None = None,
        keep_bodies: bool = True,
        name: str = "",
    ) -> None:
        self.default = response or Response(body=b"ok")
        self.handler: Handler = handler or (lambda req: self.default)
        self.keep_bodies = keep_bodies
        self.name = name
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []
        self.connections = 0
        self.open_conns: set[_Conn] = set()
        self.body_bytes = 0
        self.first_body = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def respond(self, response: Response) -> None:
        self.default = response
        self.handler = lambda req: response

    async def start(self) -> Self:
        loop = asyncio.get_running_loop()
        counter = iter(range(1, 1 << 30))
        self.server = await loop.create_server(lambda: _Conn(self, next(counter)), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in list(self.open_conns):
                if c.transport is not None:
                    c.transport.abort()
            await self.server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""Request mirroring: a fire-and-forget copy of a request to another cluster (Host ``<host>-shadow``).

The copy buffers the request body (up to ``MIRROR_BODY_LIMIT``; larger bodies cancel the copy),
sends it through the mirror cluster's pool once the original request is complete, and drops
the response. It never touches the main stream's response, timing or status.
"""

from __future__ import annotations

from typing import Any

from diktyo.proxy.codec.http1 import LAST_CHUNK, content_length_header, encode_request_head
from diktyo.snapshot.model import Mirror

MIRROR_BODY_LIMIT = 1024 * 1024


class MirrorStream:
    """One shadow request (same pool callbacks as a Stream, results ignored)."""

    __slots__ = (
        "cancelled",
        "chunked",
        "chunks",
        "cstate",
        "ended",
        "headers",
        "host",
        "length",
        "main",
        "method",
        "obuf",
        "path",
        "pending",
        "pool",
        "size",
        "uconn",
    )

    def __init__(self, main: Any, cstate: Any, pool: Any, headers: dict[str, str]) -> None:
        self.main = main
        self.cstate = cstate
        self.pool = pool
        self.host: Any = None
        self.headers = headers
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False
        self.uconn: Any = None
        self.pending = False
        self.cancelled = False
        self.obuf: list[bytes] = []
        head = main.head
        self.chunked = head.chunked
        self.length = head.content_length
        self.method = head.method
        self.path = main.path_out

    # main stream feeds
    def on_body(self, framed: bytes) -> None:
        if self.cancelled:
            return
        self.size += len(framed)
        if self.size > MIRROR_BODY_LIMIT:
            self.cancelled = True
            self.chunks = []
            return
        self.chunks.append(framed)

    def on_end(self) -> None:
        if self.cancelled or self.ended:
            return
        self.ended = True
        host = self.cstate.pick_host(self.main.lbctx or _NoCtx, frozenset())
        if host is None:
            return
        self.host = host
        self.pending = True
        self.pool.acquire(self, host, False)

    # pool callbacks
    def attach(self, uconn: Any) -> None:
        self.pending = False
        self.uconn = uconn
        h = self.headers
        if self.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif self.length is not None:
            framing = content_length_header(self.length)
        else:
            framing = b""
        data = [encode_request_head(self.method, self.path, h, framing), *self.chunks]
        if self.chunked:
            data.append(LAST_CHUNK)
        self.chunks = []
        if self.method == "HEAD":
            uconn.decoder.expect_no_body()
        uconn.transport.write(b"".join(data))

    def overflow(self, message: str) -> None:
        self.pending = False

    def connect_failed(self, reason: str) -> None:
        self.pending = False

    def on_response_head(self, status: int, headers: Any, ka: bool) -> None:
        if self.uconn is not None:
            self.uconn.keep_alive = ka

    def on_response_body(self, chunk: bytes) -> None:
        pass

    def on_response_end(self) -> None:
        u = self.uconn
        if u is None:
            return
        self.uconn = None
        if u is not None:
            self.pool.release(u)

    def on_upstream_lost(self, uconn: Any, reason: str, started: bool) -> None:
        self.uconn = None

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


class _NoCtxType:
    __slots__ = ("cookie_to_set", "headers", "query", "source_ip")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.source_ip = ""
        self.query: dict[str, str] = {}
        self.cookie_to_set = None


_NoCtx = _NoCtxType()


def shadow_host(authority: str) -> str:
    """Envoy's shadow Host: ``reviews:9080`` -> ``reviews-shadow:9080``."""
    i = authority.rfind(":")
    if i > 0 and authority[i + 1 :].isdigit():
        return f"{authority[:i]}-shadow{authority[i:]}"
    return f"{authority}-shadow"


def start_mirror(main: Any, mirror: Mirror) -> MirrorStream | None:
    rt = main.rt
    cstate = rt.clusters.get(mirror.cluster)
    if cstate is None:
        return None
    headers = dict(main.out_headers)
    headers["host"] = shadow_host(headers.get("host") or main.authority)
    ms = MirrorStream(main, cstate, rt.pool_for(cstate), headers)
    if main.req_done:
        ms.on_end()
    return ms

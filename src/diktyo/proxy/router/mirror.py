"""Request mirroring: a fire-and-forget copy of a request to another cluster (Host ``<host>-shadow``).

The copy buffers the request body (up to ``MIRROR_BODY_LIMIT``; larger bodies cancel the copy),
sends it through the mirror cluster's pool once the original request is complete (the pooled
connection's codec frames it: there is no encoder here), and drops the response. It never touches the main stream's response, timing or status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diktyo.proxy.codec.events import HeaderList, RequestHead, ResetReason, ResponseHead
from diktyo.snapshot.model import Mirror

MIRROR_BODY_LIMIT = 1024 * 1024


class MirrorStream:
    """One shadow request: a requester of the mirror cluster's pool (``UpstreamCallbacks``)
    whose response is dropped. The request is encoded by the pooled connection's codec."""

    __slots__ = (
        "cancelled",
        "chunks",
        "cstate",
        "ended",
        "head",
        "host",
        "lb_context",
        "pending",
        "pool",
        "size",
        "uconn",
    )

    def __init__(
        self, cstate: Any, pool: Any, head: RequestHead, lb_context: Callable[[], Any]
    ) -> None:
        self.cstate = cstate
        self.pool = pool
        self.head = head
        self.lb_context = lb_context
        self.host: Any = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False
        self.uconn: Any = None
        self.pending = False
        self.cancelled = False

    # main stream feeds
    def on_body(self, chunk: bytes) -> None:
        if self.cancelled:
            return
        self.size += len(chunk)
        if self.size > MIRROR_BODY_LIMIT:
            self.cancelled = True
            self.chunks = []
            return
        self.chunks.append(chunk)

    def on_end(self) -> None:
        if self.cancelled or self.ended:
            return
        self.ended = True
        host = self.cstate.pick_host(self.lb_context() or _NoCtx, frozenset())
        if host is None:
            return
        self.host = host
        self.pending = True
        self.pool.acquire(self, host, False)

    # pool callbacks
    def attach(self, uconn: Any) -> None:
        self.pending = False
        self.uconn = uconn
        codec = uconn.codec
        sid = codec.new_stream()
        chunks = self.chunks
        self.chunks = []
        codec.send_headers(sid, self.head, not chunks)
        if chunks:
            for c in chunks:
                codec.send_data(sid, c)
            codec.send_data(sid, b"", True)
        uconn.write()

    def overflow(self, message: str) -> None:
        self.pending = False

    def connect_failed(self, reason: str) -> None:
        self.pending = False

    # connection callbacks: the response is dropped
    def on_response_headers(self, sid: int, head: ResponseHead) -> None:
        pass

    def on_response_data(self, sid: int, data: bytes) -> None:
        pass

    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None:
        pass

    def on_response_end(self, sid: int) -> None:
        u = self.uconn
        if u is None:
            return
        self.uconn = None
        self.pool.release(u)

    def on_upstream_lost(self, reason: str, started: bool) -> None:
        self.uconn = None

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        # the codec reset this stream (HTTP/2 RST_STREAM, GOAWAY): as if its connection went
        self.uconn = None

    def on_send_blocked(self, sid: int) -> None:
        pass

    def on_send_unblocked(self, sid: int) -> None:
        pass

    def on_upstream_protocol_error(self, detail: str) -> None:
        self.uconn = None  # the connection closed itself; the copy's answer is dropped anyway

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def flush_downstream(self) -> None:
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


def start_mirror(
    rt: Any,
    mirror: Mirror,
    head: RequestHead,
    path: str,
    headers: dict[str, str],
    authority: str,
    lb_context: Callable[[], Any],
) -> MirrorStream | None:
    """A shadow copy of a request being forwarded: ``head`` as received, ``path`` and
    ``headers`` as forwarded (copied here); ``lb_context()`` gives the main request's load
    balancing context when the copy picks its host (once the request is complete)."""
    cstate = rt.clusters.get(mirror.cluster)
    if cstate is None:
        return None
    h = dict(headers)
    h["host"] = shadow_host(h.get("host") or authority)
    copy = RequestHead(h)
    copy.method = head.method
    copy.path = path
    copy.authority = h["host"]
    copy.scheme = head.scheme
    copy.has_body = head.has_body
    copy.chunked = head.chunked
    copy.content_length = head.content_length
    return MirrorStream(cstate, rt.pool_for(cstate), copy, lb_context)

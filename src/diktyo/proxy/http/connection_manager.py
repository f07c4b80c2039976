"""HTTP connection manager: downstream connections and the streams (requests) on them.

Theory of operation
-------------------
``HttpConnection`` is the asyncio Protocol of one downstream HTTP/1.1 connection. Its codec
(``codec.http1.Http1ServerCodec``, the ``events.ServerCodec`` interface) turns bytes into
protocol-neutral events and back: every request head becomes a ``DownstreamStream``; the
stream encodes its response through the same codec and never writes framing itself.
Pipelined requests are processed one after the other: only ``streams[0]`` is active, later
ones buffer (reading is paused while more than one is queued).

A ``DownstreamStream`` moves through explicit phases (``http.phases``: DECODING ->
FORWARDING -> RESPONDING -> RESPONDED -> DONE, or RESET), each transition checked against the
table. It runs its filter chain (``filters.contract``: authn/authz and fault before the route
action; header operations and tracing once the destination is chosen), then forwards the
request through upstream attempts: each try is one ``UpstreamRequest``
(``ClusterState.pick_host`` -> ``ConnectionPool.acquire`` -> ``attach``: head and buffered body
encoded by the upstream connection's codec, one write). Failures before the response started
become local replies with Envoy's status, body and response flag (or a retry, which is a new
attempt); failures after it reset the downstream connection. A reused pooled connection that
dies before any response byte (the keep-alive race) is retried once on a fresh connection.

No Task per request: everything runs in protocol callbacks; timers use ``loop.call_at`` only
when a timeout is configured. Header/idle timeouts are swept once a second by the sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Final, cast

from diktyo.proxy.codec import grpc
from diktyo.proxy.codec.events import (
    CodecError,
    HeaderList,
    RequestHead,
    ResetReason,
    ResponseHead,
)
from diktyo.proxy.codec.grpc import MessageCounter
from diktyo.proxy.codec.http1 import HOP_BY_HOP_STR, Http1ServerCodec
from diktyo.proxy.filters import contract as _contract
from diktyo.proxy.filters.contract import FilterChain, HttpFilter
from diktyo.proxy.filters.fault import MSG_FAULT_ABORT, FaultFilter
from diktyo.proxy.filters.header_ops import RequestHeaderOpsFilter, ResponseHeaderOpsFilter
from diktyo.proxy.filters.telemetry import (
    AccessLogFilter,
    StatsFilter,
    TracingFilter,
    span_name_for,
)
from diktyo.proxy.http import phases as _phases
from diktyo.proxy.http.phases import IllegalTransition, Phase, check_transition
from diktyo.proxy.http.policies import LbContext, RetryState
from diktyo.proxy.http.upstream_request import UpstreamRequest
from diktyo.proxy.network.peer import transport_peer
from diktyo.proxy.network.pool import Http1Pool
from diktyo.proxy.network.upstream import UpstreamConnection
from diktyo.telemetry import istio_metrics as _istio_metrics

if TYPE_CHECKING:
    from diktyo.proxy.codec.events import ServerCodec
    from diktyo.proxy.http.context import DownstreamConnection, ListenerContext, Runtime
    from diktyo.proxy.network.upstream import UpstreamConnectionLike
    from diktyo.proxy.router.matcher import CompiledDestination, CompiledRoute, RouteMatcher
    from diktyo.proxy.upstream.cluster import ClusterState

__all__ = [
    "MSG_FAULT_ABORT",
    "DownstreamStream",
    "HttpConnection",
    "RequestIds",
    "span_name_for",
]

# Envoy's order of response flags in access logs
FLAG_ORDER = (
    "LH",
    "UH",
    "UT",
    "LR",
    "UR",
    "UF",
    "UC",
    "UO",
    "NR",
    "DI",
    "FI",
    "RL",
    "UAEX",
    "RLSE",
    "DC",
    "URX",
    "SI",
    "IH",
    "DPE",
    "UMSDR",
    "RFCF",
    "NFCF",
    "DT",
    "UPE",
    "NC",
    "OM",
)
_FLAG_RANK = {f: i for i, f in enumerate(FLAG_ORDER)}

# Final (here and below): compiled, a constant is inlined and an object is a C static, where a
# module global (imported names too) costs a dictionary lookup per use (issue 11, `sat`)
DECODING: Final = _phases.DECODING
FORWARDING: Final = _phases.FORWARDING
RESPONDING: Final = _phases.RESPONDING
RESPONDED: Final = _phases.RESPONDED
RESET: Final = _phases.RESET
DONE: Final = _phases.DONE
_NEXT: Final = _phases.TRANSITIONS
STOP: Final = _contract.STOP
PEER_METADATA_HEADER: Final = _istio_metrics.PEER_METADATA_HEADER

RETRY_BUFFER_LIMIT: Final = 1024 * 1024  # body kept for retries (Envoy's default buffer limit)
BUFFER_HIGH_WATER: Final = 64 * 1024  # pause downstream reads while this much waits for upstream

# end-to-end headers a client cannot make hop-by-hop by naming them in Connection
_NEVER_HOP_BY_HOP: Final = frozenset({"host"})

MSG_CONNECT_FAILURE: Final = (
    "upstream connect error or disconnect/reset before headers. reset reason: "
)
MSG_TIMEOUT: Final = b"upstream request timeout"
MSG_NO_HEALTHY: Final = b"no healthy upstream"

# reasons the downstream connection stopped reading (bit mask)
PAUSE_PIPELINE: Final = 1
PAUSE_UPSTREAM: Final = 2
PAUSE_BUFFER: Final = 4

_monotonic: Final = time.monotonic
log = logging.getLogger("diktyo.proxy")
_NO_LB_CONTEXT: Final = LbContext({}, "", None)  # shared by requests whose LB ignores the request
_TEXT_PLAIN = (b"content-type", b"text/plain")
# grpc-message of a gRPC local reply whose HTTP form has no body
_GRPC_EMPTY_BODY_CAUSE = {
    404: "no route matched (check the VirtualService's hosts and http[].match for this "
    "authority and path)",
    403: "RBAC: access denied",
    503: "no cluster for this route (NC)",
}


# two hex digits per byte value: the last four digits of a request id by two lookups
_HEX2: Final = tuple(f"{i:02x}" for i in range(256))


class RequestIds:
    """``x-request-id`` values shaped like UUIDv4: a random 80-bit prefix per process (from the
    injected rng) plus a 48-bit counter. Unique per process, no syscall.

    ``mid`` is the prefix and the counter's upper 32 bits in hex, renewed every 65,536 ids, so an
    id costs one concatenation of ``mid`` and two table entries, where formatting all twelve
    digits (``"%012x" % n``) cost ~1,900 instructions compiled (issue 11, `sat`)."""

    __slots__ = ("mid", "n", "prefix")

    def __init__(self, rng: Any) -> None:
        h = f"{rng.getrandbits(80):020x}"
        # version 4 and RFC 4122 variant nibbles
        self.prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-"
        n: int = rng.getrandbits(32)  # typed: compiled, native integer operations in next()
        self.n = n
        self.mid = self.prefix + f"{n >> 16:08x}"

    def next(self) -> str:
        self.n = n = (self.n + 1) & 0xFFFFFFFFFFFF
        low = n & 0xFFFF
        if low == 0:  # the upper digits changed (and at the 48-bit wrap)
            self.mid = self.prefix + f"{n >> 16:08x}"
        return f"{self.mid}{_HEX2[low >> 8]}{_HEX2[low & 0xFF]}"


def request_id(rng: Any) -> str:
    """One random UUIDv4 string (slow path; the proxy uses ``RequestIds``)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def strip_edge_headers(headers: dict[str, str]) -> None:
    """At the edge (a gateway listener), drop every ``x-envoy-*`` request header, as Envoy does
    for external requests: a client must not set the route timeout
    (``x-envoy-upstream-rq-timeout-ms``), retries or other proxy controls."""
    bad = [k for k in headers if k.startswith("x-envoy-")]
    for k in bad:
        del headers[k]


def join_flags(flags: set[str] | None) -> str:
    if not flags:
        return "-"
    return ",".join(sorted(flags, key=lambda f: _FLAG_RANK.get(f, 99)))


_REQUEST_HEADER_OPS = RequestHeaderOpsFilter()
_RESPONSE_HEADER_OPS = ResponseHeaderOpsFilter()


def header_ops_in(rt: Runtime) -> tuple[bool, bool]:
    """Whether any route (or destination) has request / response header operations; a
    consistent-hash cookie counts as a response operation."""
    req = resp = False
    for m in rt.matchers.values():
        for cvh in m.vhosts:
            for cr in cvh.routes:
                req = req or bool(cr.req_ops) or any(d.req_ops for d in cr.dests)
                resp = resp or bool(cr.resp_ops) or any(d.resp_ops for d in cr.dests)
    if not resp:
        for cs in rt.clusters.values():
            ch = cs.cluster.lb.consistent_hash
            if ch is not None and ch.http_cookie:
                resp = True
                break
    return req, resp


def build_filter_chain(rt: Runtime, direction: str, reporter: str) -> FilterChain:
    """The filters of a listener direction in a snapshot (only those configured)."""
    decode: list[HttpFilter] = []
    route: list[HttpFilter] = []
    other: list[HttpFilter] = [StatsFilter(rt, reporter)]
    if rt.access_log is not None:
        other.append(AccessLogFilter(rt.access_log))
    if direction == "inbound":
        if rt.inbound_guard is not None:
            decode.append(rt.inbound_guard)
    else:
        if rt.gateway_guard is not None:
            decode.append(rt.gateway_guard)
        faults = any(
            cr.route.fault is not None
            for m in rt.matchers.values()
            for cvh in m.vhosts
            for cr in cvh.routes
        )
        if faults:
            decode.append(FaultFilter(rt.loop, rt.rng))
        req_ops, resp_ops = header_ops_in(rt)
        if req_ops:
            route.append(_REQUEST_HEADER_OPS)
        if resp_ops:
            other.append(_RESPONSE_HEADER_OPS)
    if rt.tracer is not None:
        route.append(TracingFilter(rt.tracer, direction == "inbound", rt.inbound_service))
    return FilterChain(decode, route, other)


def chain_for(rt: Runtime, ctx: ListenerContext) -> FilterChain:
    """The runtime's chain for the listener's direction (built on first use)."""
    chain = rt.filter_chains.get(ctx.direction)
    if chain is None:
        chain = rt.filter_chains[ctx.direction] = build_filter_chain(
            rt, ctx.direction, ctx.reporter
        )
    return chain


class ListenerView:
    """What a stream reads per request of its listener and of the snapshot's runtime, copied
    once per (listener, runtime) into a compiled object: native field reads instead of
    attribute lookups on the sidecar's Python objects (issue 11, `lean`). Built by the first
    request after a snapshot swap: the sidecar replaces its runtime and updates its listeners
    in one step, with no request in between."""

    def __init__(self, ctx: ListenerContext, rt: Runtime) -> None:
        self.rt = rt
        self.direction = ctx.direction
        self.cluster = ctx.cluster  # inbound: the local cluster
        self.default_host = ctx.default_host
        self.service_port = ctx.service_port
        self.server: dict[str, int] = ctx.stats.server
        self.clusters: dict[str, ClusterState] = rt.clusters
        self.matcher: RouteMatcher | None = rt.matchers.get(ctx.route_table)
        self.pools: dict[str, Any] = rt.pools
        self.rng = rt.rng
        self.peer_header = rt.peer_header
        self.request_ids: Any = rt.request_ids
        self.chain = chain = chain_for(rt, ctx)
        self.decode = chain.decode
        self.route = chain.route
        self.encode = chain.encode
        self.encode_body = chain.encode_body
        self.complete = chain.complete


# listener context -> its view of the runtime in use: the views of one runtime only (the
# first request after a swap drops the old runtime's, listeners gone from the snapshot too)
_VIEWS: dict[Any, ListenerView] = {}


def listener_view(ctx: ListenerContext, rt: Runtime) -> ListenerView:
    """The view of ``rt`` for listener ``ctx`` (one per listener, rebuilt when ``rt`` changes).
    An HTTP/1.1 connection keeps its own reference to it; until its next request an idle
    connection holds the runtime it last served on, as Envoy's connections hold the listener
    config they were accepted under until they close."""
    v = _VIEWS.get(ctx)
    if v is None or v.rt is not rt:
        if _VIEWS and next(iter(_VIEWS.values())).rt is not rt:
            _VIEWS.clear()  # a new runtime: the old one's views go, the old runtime with them
        v = _VIEWS[ctx] = ListenerView(ctx, rt)
    return v


class HttpConnection(asyncio.Protocol):
    """One downstream HTTP/1.1 connection (see module docstring); the codec's ``ServerSink``."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.sidecar = ctx.sidecar
        self.view: ListenerView | None = None  # of the runtime its last request ran on
        self.codec = Http1ServerCodec(self, accept_http_10=ctx.sidecar.accept_http_10)
        self.codec.h1 = self  # compiled: the codec's events are native calls to this class
        self.decoder = self.codec.decoder  # header-timeout bookkeeping reads it per read
        self.transport: asyncio.Transport | None = None
        # a list, not a deque: a deque allocates a 64-slot block (~600 B) per idle connection
        self.streams: list[DownstreamStream] = []
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self._close_after = False
        self.peer = ""
        self.last_activity = 0.0
        self.head_start = 0.0  # arrival of the first byte of the request head being read
        self.requests = 0
        # (spiffe id, DER) of the mTLS client, read once on first use (tls_peer); a declared
        # attribute, not a __dict__ entry: the compiled class has no __dict__
        self.mtls_peer: tuple[str, bytes | None] | None = None

    @property
    def close_after(self) -> bool:
        """True: close once the request in flight is answered (drain, a bad pipelined request)."""
        return self._close_after

    @close_after.setter
    def close_after(self, value: bool) -> None:
        self._close_after = value
        if value:
            self.codec.drain()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCP/TLS transports are Transports without subclassing it
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.last_activity = _monotonic()
        self.ctx.connections.add(self)
        self.ctx.stats.server["downstream_cx_total"] += 1

    def data_received(self, data: bytes) -> None:
        self.last_activity = now = _monotonic()
        error = None
        decoder = self.decoder
        begun = decoder.begun
        try:
            decoder.feed(data)  # (codec.feed is this method; compiled, this call is native)
        except CodecError as exc:
            error = exc
        if decoder.begun != begun:
            self.head_start = now  # a head began in this read: the header timer starts here
        if self.streams:
            s = self.streams[0]
            s.in_read = False
            u = s.upstream
            if u is not None:
                uc = u.conn
                if isinstance(uc, UpstreamConnection):  # compiled: a native call
                    uc.write()  # what this read produced for the upstream, in one write
                elif uc is not None:
                    uc.write()
        if error is not None:
            self.codec_error(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        streams = list(self.streams)
        self.streams.clear()
        for s in streams:
            s.downstream_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.streams:
            self.streams[0].downstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.streams:
            self.streams[0].downstream_write_paused(False)

    # -- codec events (ServerSink)
    def on_request_headers(self, sid: int, head: RequestHead) -> None:
        self.requests += 1
        s = DownstreamStream(self, sid, head)
        self.streams.append(s)
        if len(self.streams) == 1:
            s.in_read = True  # started inside data_received, which writes what it encodes
            try:  # start_stream(s) inlined: one Python call less per request
                s.start()
            except Exception:  # noqa: BLE001 - a bug costs one request (logged, 500)
                self.internal_error(s)
        else:
            self.pause(PAUSE_PIPELINE)

    def on_request_data(self, sid: int, data: bytes) -> None:
        self.streams[-1].decode_data(data)

    def on_request_trailers(self, sid: int, trailers: HeaderList) -> None:
        if self.streams:  # (the HTTP/1.1 decoder drops request trailers: never called today)
            self.streams[-1].decode_trailers(trailers)

    def on_request_end(self, sid: int) -> None:
        if self.streams:
            self.streams[-1].decode_end()

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        for s in list(self.streams):
            if s.sid == sid:
                s.downstream_lost()

    def on_send_blocked(self, sid: int) -> None:
        pass  # HTTP/1.1: pause_writing on the transport does this

    def on_send_unblocked(self, sid: int) -> None:
        pass

    # -- what a stream uses
    def flush(self) -> None:
        """Write what the codec encoded (one ``transport.write``)."""
        codec = self.codec
        out = codec.out  # codec.data_to_send() inlined (hot path)
        if out:
            codec.out = []
            t = self.transport
            if t is not None and not self.closed:
                t.write(out[0] if len(out) == 1 else b"".join(out))

    def send_continue(self, sid: int) -> None:
        self.codec.send_continue(sid)
        self.flush()

    def reset_stream(self, sid: int) -> None:
        """HTTP/1.1 has no stream reset: abort the connection."""
        self.codec.send_reset(sid, ResetReason.LOCAL_RESET)
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    def tls_peer(self) -> tuple[str, bytes | None]:
        """``(spiffe id, DER certificate)`` of the mTLS client, ``("", None)`` without."""
        peer = self.mtls_peer
        if peer is None:
            peer = self.mtls_peer = transport_peer(self.transport)
        return peer

    def start_stream(self, s: DownstreamStream) -> None:
        try:
            s.start()
        except Exception:  # noqa: BLE001 - a bug costs one request (logged, 500)
            self.internal_error(s)

    def internal_error(self, s: DownstreamStream) -> None:
        """A bug must cost one request (500), never the connection or process."""
        log.exception("internal error handling %s %s", s.head.method, s.head.path)
        server = self.ctx.stats.server
        server["downstream_rq_internal_error"] = server.get("downstream_rq_internal_error", 0) + 1
        if s.phase < RESPONDING:
            self.close_after = True
            s.local_reply(500, b"internal proxy error", "")

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def codec_error(self, exc: CodecError) -> None:
        server = self.ctx.stats.server
        server["downstream_rq_total"] += 1
        server[f"downstream_rq_{exc.status}"] = server.get(f"downstream_rq_{exc.status}", 0) + 1
        last = self.streams[-1] if self.streams else None
        if last is not None and not last.req_done:
            last.downstream_protocol_error(exc)
            return
        if self.streams:
            # a valid request is in flight: close once it is answered
            self.close_after = True
            self.pause(PAUSE_PIPELINE)
            return
        if self.transport is not None and not self.closed:
            self.codec.send_error(exc.status, exc.message)
            self.flush()
            self.transport.close()
            self.closed = True

    def stream_done(self, s: DownstreamStream) -> None:
        if self.streams and self.streams[0] is s:
            del self.streams[0]
        if self.closed:
            return
        if self._close_after or self.codec.closing:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        if self.streams:
            if len(self.streams) == 1 and self.paused:
                self.resume(PAUSE_PIPELINE)
            self.start_stream(self.streams[0])
        elif self.paused:
            self.resume(PAUSE_PIPELINE)

    def idle_check(self, now: float, header_timeout: float, idle_timeout: float) -> None:
        """Called by the sidecar's 1 s sweep: header timeout (408) and idle timeout.

        The header timeout is absolute, counted from the first byte of the head (as nginx's
        ``client_header_timeout`` and Envoy's ``request_headers_timeout``): a client that
        drips one byte at a time is answered 408 and closed all the same."""
        if self.closed or self.transport is None:
            return
        if self.streams:
            s = self.streams[0]
            if s.tunnel_seen:  # a WebSocket: the cluster's idle timeout if shorter
                limit = idle_timeout
                cs = s.cstate
                if cs is not None:
                    limit = min(limit, cs.cluster.pool.idle_timeout)
                if now - s.tunnel_seen > limit:
                    self.ctx.stats.server["downstream_cx_idle_timeout"] += 1
                    self.transport.close()  # connection_lost ends the stream and its upstream
            return
        if self.decoder.in_head:
            if now - self.head_start > header_timeout:
                server = self.ctx.stats.server
                server["downstream_rq_header_timeout"] = (
                    server.get("downstream_rq_header_timeout", 0) + 1
                )
                self.codec.send_error(408, "request header timeout")
                self.flush()
                self.transport.close()
                self.closed = True
        elif now - self.last_activity > idle_timeout:
            self.transport.close()
            self.closed = True


def _stamp_response_end(state: dict[str, Any]) -> None:
    """A traced stream's span ends when its last response byte is handed to the transport,
    stamped just before that write: a caller that has the whole response can never end its
    own span before this one (stamped after the write, a descheduled sidecar would end the
    callee's span after the caller's)."""
    span = state.get("span")
    tracer = state.get("tracer")
    if span is not None and tracer is not None:
        tracer.responded(span)


_DECODING: Final = DECODING  # (a Final name: a class-level default mypyc compiles, tidy)


class DownstreamStream:
    """One request/response exchange on a downstream connection, independent of the wire
    protocol: it talks to its connection's codec through the ``events`` interfaces, to its
    filters through ``FilterCallbacks`` (which it implements) and to the upstream through one
    ``UpstreamRequest`` per attempt."""

    # Class-level defaults: a new stream only sets what differs per request (no __slots__,
    # so the fields below cost nothing until a request actually changes them).
    phase: Phase = _DECODING
    rt: Runtime
    chain: FilterChain | None = None
    filter_stage = 0  # 0: decode filters, 1: route filters (where continue_decoding resumes)
    filter_index = 0
    route: CompiledRoute | None = None
    view: ListenerView | None = None  # set by start: the listener's view of the runtime
    route_done = False
    block = 0
    dest: CompiledDestination | None = None
    cstate: Any = None
    pool: Any = None
    host: Any = None
    tried: set[tuple[str, int]] | None = None  # (a tuple|set union here: mypyc drops the default)
    rs: Any = None
    attempt = 1
    upstream: UpstreamRequest | None = None
    # request body kept for retries / until an attempt attaches (None until a body chunk
    # comes: a bodiless request allocates no list)
    chunks: list[bytes] | None = None
    chunks_size = 0
    replayable = True
    req_done = False
    req_bytes = 0
    resp_bytes = 0
    status = 0
    flags: set[str] | None = None
    timer: asyncio.TimerHandle | None = None
    retry_timer: asyncio.TimerHandle | None = None
    lbctx: Any = None
    race_retried = False
    in_retry = False  # a retry slot is held while the retry waits for its backoff
    mirrors: list[Any] | None = None
    discard = False
    per_try: float | None = None
    upstream_head: RequestHead | None = None  # the head as forwarded, when the path differs
    state: dict[str, Any] | None = None  # per-stream filter state
    peer: Any = None  # inbound: metric labels from the mTLS peer / peer metadata
    grpc = False  # content-type application/grpc (h2: local replies, grpc-timeout, status)
    grpc_status = ""  # the response's grpc-status (trailers, or a trailers-only head)
    trailers_only: ResponseHead | None = None  # a gRPC trailers-only head, held for END_STREAM
    grpc_msgs: tuple[MessageCounter, MessageCounter] | None = None  # (request, response)
    tunnel_seen = 0.0  # WebSocket after its 101: last byte either way (0: not a tunnel)
    req_trailers: HeaderList | None = None  # request trailers, kept for retries
    resp_trailers_sent = False
    # started by an HTTP/1.1 read that is still being decoded: the attempt's request bytes
    # are written once by HttpConnection.data_received at the end of the read
    in_read = False

    def __init__(self, conn: DownstreamConnection, sid: int, head: RequestHead) -> None:
        self.conn = conn
        # the connection when it is an HTTP/1.1 one (HTTP/2 streams have a per-stream view):
        # compiled, calls on it and on its codec are native instead of generic (issue 11)
        h1 = conn if isinstance(conn, HttpConnection) else None
        self.h1: HttpConnection | None = h1
        if h1 is not None:  # (native reads)
            self.codec: ServerCodec = h1.codec
            self.ctx: ListenerContext = h1.ctx
        else:
            self.codec = conn.codec
            self.ctx = conn.ctx
        self.sid = sid
        self.head = head
        # HTTP/1.1: the time of the read that carried this head (data_received's clock read:
        # one clock call less per request; issue 11, `sat`)
        self.t0 = h1.last_activity if h1 is not None else _monotonic()
        self.out_headers: dict[str, str] = head.headers
        self.path_out = head.path
        self.authority = head.authority

    def _go(self, new: Phase) -> None:
        self.phase = check_transition(self.phase, new)

    # The hot path inlines _go: ``if NEW not in _NEXT[self.phase]: raise ...`` (same table).

    def add_flag(self, flag: str) -> None:
        if self.flags is None:
            self.flags = {flag}
        else:
            self.flags.add(flag)

    # ------------------------------------------------------------------ FilterCallbacks
    def route_entry(self) -> CompiledRoute | None:
        if self.route_done:
            return self.route
        self.route_done = True
        v = self.view
        assert v is not None  # (set by start)
        if v.direction == "inbound":
            return None
        head = self.head
        authority = v.default_host or head.authority
        self.authority = authority
        matcher = v.matcher
        if matcher is None:
            return None
        found = matcher.match_request(
            head.method, head.path, authority, head.headers, head.scheme, v.service_port
        )
        if found is not None:
            self.route, self.block = found
        return self.route

    def routing_authority(self) -> str:
        return self.authority

    def downstream_address(self) -> str:
        return self.conn.peer

    def downstream_tls_peer(self) -> tuple[str, bytes | None]:
        return self.conn.tls_peer()

    def service_port(self) -> int:
        return self.ctx.service_port

    def send_local_reply(
        self, status: int, body: bytes, flag: str, headers: HeaderList | None = None
    ) -> None:
        self.local_reply(status, body, flag, headers)

    def active(self) -> bool:
        return self.phase is DECODING

    def set_upstream_path(self, path: str) -> None:
        self.path_out = path

    def set_upstream_cluster(self, name: str) -> None:
        if self.cstate is None:
            self.cstate = self.rt.clusters.get(name)

    def set_peer_labels(self, labels: Any) -> None:
        self.peer = labels

    def peer_labels(self) -> Any:
        return self.peer

    def lb_cookie(self) -> tuple[str, str, float] | None:
        lb = self.lbctx
        return None if lb is None else lb.cookie_to_set

    def set_state(self, key: str, value: Any) -> None:
        if self.state is None:
            self.state = {key: value}
        else:
            self.state[key] = value

    def get_state(self, key: str) -> Any:
        return None if self.state is None else self.state.get(key)

    def continue_decoding(self) -> None:
        if self.phase is not DECODING:
            return
        try:
            if self.filter_stage == 0:
                self.start(self.filter_index)
            else:
                self.run_route_filters(self.filter_index)
        except Exception:  # noqa: BLE001 - a bug costs one request (logged, 500)
            self.conn.internal_error(self)

    # ------------------------------------------------------------------ request side
    def start(self, i: int = 0) -> None:
        """Start the stream (``i == 0``: per-request setup, then the decoder filters from the
        first), or resume its decoder filters at ``i`` (``continue_decoding``); then match
        the route and go on. One method for both, so a request whose chain has no decoder
        filter (the common case) costs no extra call here."""
        head = self.head
        ctx = self.ctx
        if i == 0:
            h1 = self.h1
            if h1 is not None:
                rt = h1.sidecar.rt
                assert rt is not None
                v = h1.view
                if v is None or v.rt is not rt:
                    v = h1.view = listener_view(ctx, rt)
            else:
                rt = ctx.sidecar.rt
                assert rt is not None
                v = listener_view(ctx, rt)
            self.view = v
            self.rt = rt
            direction = v.direction
            ct = head.headers.get("content-type")
            if ct is not None and ct.startswith("application/grpc"):
                self.grpc = grpc.is_grpc(ct)
                if self.grpc:
                    self.grpc_msgs = (MessageCounter(), MessageCounter())
            if head.expect_continue and head.has_body and not self.req_done:
                self.conn.send_continue(self.sid)
            self.chain = v.chain
            if direction == "inbound":
                self.cstate = v.clusters.get(v.cluster)
                if self.cstate is None:
                    self.local_reply(503, b"", "NC")
                    return
            elif direction == "gateway":
                strip_edge_headers(head.headers)
        else:
            v = self.view
            assert v is not None
            direction = v.direction
        filters = v.decode
        n = len(filters)
        while i < n:
            f = filters[i]
            i += 1
            if f.decode_headers(self, head) is STOP:
                self.filter_stage = 0
                self.filter_index = i
                return
            if self.phase is not DECODING:
                return
        if direction == "inbound":
            self.prepare_headers()
            self.run_route_filters(0)
            return
        cr = self.route_entry()
        if cr is None:
            self.local_reply(404, b"", "NR")
            return
        # the route's action (here, not in a method of its own: one call less per request)
        route = cr.route
        if cr.terminal:  # a direct response or a redirect (one native test for both)
            if route.direct_response is not None:
                dr = route.direct_response
                hdrs: HeaderList = []
                if cr.resp_ops:
                    hdrs = cr.resp_ops.apply_response(hdrs)
                self.local_reply(dr.status, dr.body.encode(), "", hdrs)
                return
            if route.redirect is not None:
                self.local_reply(
                    route.redirect.code, b"", "", [(b"location", self.redirect_location().encode())]
                )
                return
        dest = cr.pick(v.rng)
        if dest is None:
            self.local_reply(503, b"", "NC")
            return
        self.dest = dest
        self.cstate = v.clusters.get(dest.cluster)
        if self.cstate is None:
            self.local_reply(503, b"", "NC")
            return
        self.prepare_headers()
        h = self.out_headers
        peer_header = v.peer_header
        if peer_header is not None:  # who we are, for the server's telemetry (mesh only)
            h[PEER_METADATA_HEADER] = peer_header
        if cr.has_rewrite:
            rw = route.rewrite
            self.path_out = cr.rewrite_path(self.head.path, self.block)
            if self.path_out != self.head.path:
                h["x-envoy-original-path"] = self.head.path
            if rw is not None and rw.authority:
                h["host"] = rw.authority
        self.run_route_filters(0)

    def run_route_filters(self, i: int) -> None:
        v = self.view
        assert v is not None  # (set by start)
        filters = v.route
        head = self.head
        n = len(filters)
        while i < n:
            f = filters[i]
            i += 1
            if f.decode_headers(self, head) is STOP:
                self.filter_stage = 1
                self.filter_index = i
                return
            if self.phase is not DECODING:
                return
        cr = self.route
        if cr is not None and cr.has_mirrors:
            self.start_mirrors(cr)
        # begin: timeouts, retry state, first attempt (here, not in a method of its own: the
        # common route, without timeout, retries or upgrade, skips each stage with one test)
        if FORWARDING not in _NEXT[self.phase]:
            raise IllegalTransition(self.phase, FORWARDING)
        self.phase = FORWARDING
        head = self.head
        hh = head.headers
        timeout = cr.timeout if cr is not None else None
        if self.grpc:  # Istio: grpc-timeout applies, capped by the route's timeout
            timeout = grpc.effective_timeout(timeout, hh.get("grpc-timeout"))
        ov = hh.get("x-envoy-upstream-rq-timeout-ms")
        if ov is not None and ov.isdigit():
            timeout = int(ov) / 1000.0
        if timeout:
            self.timer = self.rt.loop.call_later(timeout, self.on_timeout)
        if cr is not None and cr.retries is not None:
            self.per_try = cr.retries.per_try_timeout
        cs: ClusterState = self.cstate  # typed: native attribute reads when compiled
        self.pool = pool = v.pools[cs.name]
        if head.upgrade_to and pool.protocol != "HTTP/1.1":
            # a WebSocket upgrade needs HTTP/1.1 to the endpoints; Envoy refuses an upgrade
            # its route cannot carry with 403 (response code details "upgrade_failed")
            self.local_reply(
                403,
                f"websocket upgrade refused: cluster {cs.cluster.name} speaks "
                f"{pool.protocol} to its endpoints (port protocol {cs.cluster.protocol!r}); "
                "name the port http (or drop h2UpgradePolicy: UPGRADE) to carry WebSockets".encode(),
                "",
            )
            return
        if cs.hashed:
            self.lbctx = LbContext(self.out_headers, self.conn.peer, None)
        else:
            self.lbctx = _NO_LB_CONTEXT
        self.attempt_upstream(False)

    def redirect_location(self) -> str:
        cr = self.route
        assert cr is not None
        rd = cr.route.redirect
        assert rd is not None
        head = self.head
        scheme = rd.scheme or head.scheme
        authority = rd.authority or self.authority
        if rd.port is not None:
            i = authority.rfind(":")
            if i > 0 and authority[i + 1 :].isdigit():
                authority = authority[:i]
            if (scheme, rd.port) not in (("http", 80), ("https", 443)):  # default: not written
                authority = f"{authority}:{rd.port}"
        path = head.path
        if rd.uri is not None:
            q = path.find("?")
            path = rd.uri if ("?" in rd.uri or q < 0) else rd.uri + path[q:]
        elif rd.prefix_rewrite is not None:
            path = cr.rewrite_prefix(path, self.block, rd.prefix_rewrite)
        return f"{scheme}://{authority}{path}"

    def prepare_headers(self) -> None:
        """Strip hop-by-hop headers (in place), add x-forwarded-*, x-request-id."""
        head = self.head
        h = head.headers
        # hop_by_hop False: the HTTP/1.1 decoder saw none of these names (no set walk)
        if head.hop_by_hop and not HOP_BY_HOP_STR.isdisjoint(h):
            conn_hdr = h.get("connection")
            if conn_hdr is not None:
                for t in conn_hdr.split(","):
                    t = t.strip().lower()
                    if t not in _NEVER_HOP_BY_HOP:  # "Connection: host" must not strip Host
                        h.pop(t, None)
            for k in HOP_BY_HOP_STR.intersection(h):
                del h[k]
        h1 = self.h1
        peer = h1.peer if h1 is not None else self.conn.peer
        if peer:
            xff = h.get("x-forwarded-for")
            h["x-forwarded-for"] = peer if xff is None else f"{xff}, {peer}"
        if "x-request-id" not in h:
            # cast: compiled, a native call
            v = self.view
            ids = cast(RequestIds, v.request_ids if v is not None else self.rt.request_ids)
            h["x-request-id"] = ids.next()
        if "x-forwarded-proto" not in h:
            h["x-forwarded-proto"] = self.head.scheme
        self.out_headers = h

    def retry_state(self) -> Any:
        """The request's RetryState, created on the first failure (most requests never need it)."""
        rs = self.rs
        if rs is None:
            route = self.route.route if self.route is not None else None
            rs = self.rs = RetryState(
                route.retries if route is not None else None,
                self.rt.rng,
                getattr(self.cstate, "retry_budget", None),
            )
        return rs

    def attempt_upstream(self, fresh: bool) -> None:
        cs: ClusterState = self.cstate  # typed: a native pick_host call when compiled
        tried = self.tried
        host = cs.pick_host(self.lbctx) if tried is None else cs.pick_host(self.lbctx, tried)
        if host is None:
            self.local_reply(503, MSG_NO_HEALTHY, "UH")
            return
        self.host = host
        if tried is None:
            self.tried = {host.key}
        else:
            tried.add(host.key)
        if not cs.breaker.try_start_request():
            self.local_reply(503, cs.breaker.overflow_message("requests").encode(), "UO")
            return
        a = UpstreamRequest(self, host, self.attempt, self.in_retry)
        self.in_retry = False  # the retry slot now belongs to the attempt
        self.upstream = a
        a.pending = True
        pool = self.pool
        if isinstance(pool, Http1Pool):  # compiled: a native call (HTTP/2 pools are Python)
            pool.acquire(a, host, fresh)
        else:
            pool.acquire(a, host, fresh)

    # attempt callbacks (UpstreamRequest calls these only while attached) ------------------
    def attempt_attached(self, a: UpstreamRequest) -> None:
        conn = a.conn
        assert conn is not None
        h = self.out_headers
        h["x-envoy-attempt-count"] = "1" if a.attempt == 1 else str(a.attempt)
        head = self.head
        if self.path_out != head.path:
            uh = self.upstream_head
            if uh is None:
                uh = self.upstream_head = RequestHead(h)
                uh.method = head.method
                uh.path = self.path_out
                uh.authority = head.authority
                uh.scheme = head.scheme
                uh.has_body = head.has_body
                uh.chunked = head.chunked
                uh.content_length = head.content_length
        else:
            uh = head
        chunks = self.chunks
        req_done = self.req_done
        trailers = self.req_trailers
        if isinstance(conn, UpstreamConnection) and not chunks and trailers is None:
            # HTTP/1.1, nothing but the head yet (the common case): compiled, native calls
            c1 = conn.codec
            a.sid = sid = c1.new_stream()
            c1.send_headers(sid, uh, req_done)
            if req_done:
                a.sent_all = True
            if not self.in_read:  # else data_received writes it with the rest of the read
                conn.write()
        else:
            self.send_attempt(a, conn, uh, chunks, req_done, trailers)
        h1 = self.h1
        if h1 is not None:
            if h1.paused & PAUSE_BUFFER:
                h1.resume(PAUSE_BUFFER)
            if h1.write_paused:
                conn.pause_reading()
        else:
            dc = self.conn
            if dc.paused & PAUSE_BUFFER:
                dc.resume(PAUSE_BUFFER)
            if dc.write_paused:
                conn.pause_reading()
        pt = self.per_try
        if pt:
            a.start_try_timer(self.rt.loop, pt)

    def send_attempt(
        self,
        a: UpstreamRequest,
        conn: UpstreamConnectionLike,
        uh: RequestHead,
        chunks: list[bytes] | None,
        req_done: bool,
        trailers: HeaderList | None,
    ) -> None:
        """Encode the request for attempt ``a`` on ``conn``: head, the body kept so far and the
        trailers; written at once unless a downstream read is being decoded."""
        codec = conn.codec
        a.sid = sid = codec.new_stream()
        codec.send_headers(sid, uh, req_done and not chunks and trailers is None)
        if chunks:
            for c in chunks:
                codec.send_data(sid, c)
            if not self.replayable:
                self.chunks = None
                self.chunks_size = 0
            if req_done and trailers is None:
                codec.send_data(sid, b"", True)
        if req_done and trailers is not None:
            codec.send_trailers(sid, trailers)
        if req_done:
            a.sent_all = True
        if not self.in_read:  # else data_received writes it, with what the rest of the read adds
            conn.write()

    def attempt_overflow(self, a: UpstreamRequest, message: str) -> None:
        self.local_reply(503, message.encode(), "UO")

    def attempt_connect_failed(self, a: UpstreamRequest, reason: str) -> None:
        self._drop(a)
        a.end(None, True)
        if self.try_retry_reset("connect-failure"):
            return
        self.local_reply(503, (MSG_CONNECT_FAILURE + reason).encode(), "UF")

    def _drop(self, a: UpstreamRequest) -> UpstreamConnectionLike | None:
        """Stop listening to attempt ``a``; returns its connection (the caller resets the
        attempt's stream on it, or releases it)."""
        a.detach()
        if self.upstream is a:
            self.upstream = None
        conn = a.conn
        a.conn = None
        return conn

    # request body -----------------------------------------------------------------
    def decode_data(self, chunk: bytes) -> None:
        self.req_bytes += len(chunk)
        if self.tunnel_seen:
            self.tunnel_seen = _monotonic()
        if self.grpc_msgs is not None:
            self.grpc_msgs[0].feed(chunk)
        if self.discard or self.phase >= RESPONDED:
            return
        chain = self.chain
        if chain is not None and chain.decode_body:
            for f in chain.decode_body:
                f.decode_data(self, chunk, False)
        if self.mirrors:
            for m in self.mirrors:
                m.on_body(chunk)
        a = self.upstream
        if a is not None and a.conn is not None:
            a.conn.codec.send_data(a.sid, chunk)
            if self.replayable:
                kept = self.chunks
                if kept is None:
                    kept = self.chunks = []
                kept.append(chunk)
                self.chunks_size += len(chunk)
                if self.chunks_size > RETRY_BUFFER_LIMIT:
                    self.replayable = False
                    self.chunks = None
                    self.chunks_size = 0
        else:
            kept = self.chunks
            if kept is None:
                kept = self.chunks = []
            kept.append(chunk)
            self.chunks_size += len(chunk)
            if self.chunks_size > BUFFER_HIGH_WATER:
                self.conn.pause(PAUSE_BUFFER)
                if self.chunks_size > RETRY_BUFFER_LIMIT:
                    self.replayable = False

    def decode_trailers(self, trailers: HeaderList) -> None:
        """Request trailers (HTTP/2, gRPC): forwarded before the end of the request (not to
        mirrors; HTTP/1.1 upstreams get them only on a chunked request)."""
        if self.discard or self.phase >= RESPONDED:
            return
        chain = self.chain
        if chain is not None and chain.decode_body:
            for f in chain.decode_body:
                f.decode_trailers(self, trailers)
        self.req_trailers = trailers

    def decode_end(self) -> None:
        self.req_done = True
        if self.mirrors:
            for m in self.mirrors:
                m.on_end()
        if self.phase is RESPONDED:
            self.finish()
            return
        a = self.upstream
        if a is not None and not self.discard:
            conn = a.conn
            if isinstance(conn, UpstreamConnection) and self.req_trailers is None:
                conn.codec.send_data(a.sid, b"", True)  # compiled: a native call
                a.sent_all = True
            elif conn is not None:
                if self.req_trailers is not None:
                    conn.codec.send_trailers(a.sid, self.req_trailers)
                else:
                    conn.codec.send_data(a.sid, b"", True)
                a.sent_all = True

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.conn.pause(PAUSE_UPSTREAM)
        else:
            self.conn.resume(PAUSE_UPSTREAM)

    def downstream_write_paused(self, paused: bool) -> None:
        a = self.upstream
        conn = a.conn if a is not None else None
        if conn is not None:
            if paused:
                conn.pause_reading()
            else:
                conn.resume_reading()

    def downstream_protocol_error(self, exc: CodecError) -> None:
        """Malformed body framing from the client mid-request."""
        self.conn.close_after = True
        self.req_done = True
        a = self.upstream
        if a is not None and a.conn is not None:  # (a pending one is cancelled below)
            conn = self._drop(a)
            if conn is not None:
                conn.reset_stream(a.sid)
            a.end(None, False, cancel=True)
        self.local_reply(exc.status, exc.message.encode(), "")

    # ------------------------------------------------------------------ response side
    def upstream_headers(self, a: UpstreamRequest, head: ResponseHead) -> None:
        if self.phase is not FORWARDING:
            return  # a second response head from a misbehaving codec: the first one stands
        t = a.try_timer
        if t is not None:
            a.try_timer = None
            t.cancel()
        status = head.status
        if self.grpc:
            g = grpc.status_of(head.pairs(), None)
            if g:
                self.grpc_status = g  # trailers-only: retryOn's gRPC conditions look here
                if self.retry_status(a, status, {"grpc-status": g}):
                    return
        if status >= 400 and self.retry_status(a, status):
            return
        self.phase = RESPONDING  # FORWARDING -> RESPONDING, checked above
        self.status = status
        if status == 101:  # WebSocket tunnel: no route timeout from here, the idle timeout
            self.tunnel_seen = _monotonic()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        v = self.view
        if v is not None:
            for f in v.encode:
                f.encode_headers(self, head)
        if self.grpc_status:
            self.trailers_only = head  # sent with END_STREAM by upstream_end (gRPC needs that)
            return
        h1 = self.h1
        if h1 is not None:  # compiled: a native call
            h1.codec.send_headers(self.sid, head)
        else:
            self.codec.send_headers(self.sid, head)

    def upstream_data(self, a: UpstreamRequest, data: bytes) -> None:
        if self.phase is not RESPONDING:
            return
        if self.trailers_only is not None:  # not trailers-only after all: the head goes first
            self.codec.send_headers(self.sid, self.trailers_only)
            self.trailers_only = None
        if self.grpc_msgs is not None:
            self.grpc_msgs[1].feed(data)
        if self.tunnel_seen:
            self.tunnel_seen = _monotonic()
        self.resp_bytes += len(data)
        v = self.view
        if v is not None and v.encode_body:
            for f in v.encode_body:
                f.encode_data(self, data, False)
        h1 = self.h1
        if h1 is not None:  # compiled: a native call
            h1.codec.send_data(self.sid, data)
        else:
            self.codec.send_data(self.sid, data)

    def upstream_trailers(self, a: UpstreamRequest, trailers: HeaderList) -> None:
        """Response trailers (gRPC status) end the response on the wire; the end event that
        follows only completes the stream."""
        if self.phase is not RESPONDING or self.resp_trailers_sent:
            return
        if self.trailers_only is not None:  # a head held as trailers-only goes first after all
            self.codec.send_headers(self.sid, self.trailers_only)
            self.trailers_only = None
        if self.grpc:
            self.grpc_status = grpc.status_of(None, trailers) or self.grpc_status
        chain = self.chain
        if chain is not None and chain.encode_body:
            for f in chain.encode_body:
                f.encode_trailers(self, trailers)
        self.resp_trailers_sent = True
        self.codec.send_trailers(self.sid, trailers)

    def upstream_end(self, a: UpstreamRequest) -> None:
        if self.phase is not RESPONDING:
            return
        to = self.trailers_only
        h1 = self.h1
        if to is not None:
            self.trailers_only = None
            self.codec.send_headers(self.sid, to, True)
        elif not self.resp_trailers_sent:
            if h1 is not None:  # compiled: a native call
                h1.codec.send_data(self.sid, b"", True)
            else:
                self.codec.send_data(self.sid, b"", True)
        if self.state is not None:
            _stamp_response_end(self.state)
        self.phase = RESPONDED  # RESPONDING -> RESPONDED, checked above
        status = self.status
        a.end(status, status == 502 or status == 503 or status == 504)
        # self._drop(a) inlined (hot path); a.detach() is only this, end() cancelled the timer
        a.stream = None
        self.upstream = None
        conn = a.conn
        a.conn = None
        if conn is not None:
            # request bytes still encoded but not written (a fast response); an HTTP/1.1
            # connection's codec says so without a call (usually there are none)
            if type(conn) is not UpstreamConnection or conn.codec.out:
                conn.write()
            if a.sent_all:
                pool = self.pool
                if isinstance(pool, Http1Pool):  # compiled: a native call
                    pool.release(conn)  # type: ignore[arg-type]  # an Http1Pool lends UpstreamConnections
                else:
                    pool.release(conn)
            else:
                conn.reset_stream(a.sid)
                self.discard = True
        # downstream after the pool had the connection back (tls2, issue 14): as in Envoy, whose
        # downstream write waits for the event loop, a request pending for this connection's
        # slot gets its own new connection going before the client sees this response
        if h1 is not None:  # compiled: a native call
            h1.flush()
        else:
            self.conn.flush()
        if self.req_done:
            self.finish()

    def retry_status(
        self, a: UpstreamRequest, status: int, headers: dict[str, str] | None = None
    ) -> bool:
        if not self.replayable or self.cstate is None:
            return False
        rs = self.retry_state()
        if not rs.should_retry_status(status, headers):
            if getattr(rs, "refused", None) == "limit" and self.attempt > 1:
                self.add_flag("URX")
            return False
        if not self.start_retry():
            return False
        conn = self._drop(a)
        if conn is not None:
            conn.reset_stream(a.sid)
        a.end(status, status in (502, 503, 504))
        self.in_retry = True
        self.schedule_retry()
        return True

    def try_retry_reset(self, kind: str) -> bool:
        if not self.replayable or self.phase >= RESPONDING or self.cstate is None:
            return False
        rs = self.retry_state()
        if not rs.should_retry_reset(kind):
            if getattr(rs, "refused", None) == "limit" and self.attempt > 1:
                self.add_flag("URX")
            return False
        if not self.start_retry():
            return False
        self.in_retry = True
        self.schedule_retry()
        return True

    def start_retry(self) -> bool:
        br = self.cstate.breaker
        if not br.try_start_retry():
            self.rt.stats.inc_cluster(self.cstate.cluster.name, "upstream_rq_retry_overflow")
            return False
        self.rt.stats.inc_cluster(self.cstate.cluster.name, "upstream_rq_retry")
        return True

    def schedule_retry(self) -> None:
        self.attempt += 1
        delay = self.retry_state().next_backoff()
        self.retry_timer = self.rt.loop.call_later(delay, self.do_retry)

    def do_retry(self) -> None:
        self.retry_timer = None
        if self.phase is not FORWARDING:
            return
        self.attempt_upstream(False)  # the retry slot goes to the new attempt

    def upstream_lost(self, a: UpstreamRequest, reason: str, started: bool) -> None:
        conn = self._drop(a)
        reused = conn is not None and conn.reused
        a.end(None, True)
        if self.phase is RESPONDING:
            self.add_flag("UC")
            self.reset_downstream()
            return
        if self.phase is not FORWARDING:
            return
        if reused and not started and not self.race_retried and self.replayable:
            # keep-alive race: the pooled connection was closed by the upstream as we reused it
            self.race_retried = True
            self.rt.stats.inc_cluster(self.cstate.cluster.name, "upstream_rq_keepalive_race_retry")
            self.tried = None
            self.attempt_upstream(True)
            return
        if self.try_retry_reset("reset"):
            return
        self.local_reply(503, (MSG_CONNECT_FAILURE + reason).encode(), "UC")

    def upstream_protocol_error(self, a: UpstreamRequest, detail: str) -> None:
        """The upstream's response broke HTTP/1.1 (a 101 nobody asked for, a head over
        60 KiB, bad framing): Envoy answers 502 with flag ``UPE`` and never forwards it."""
        self._drop(a)
        host = a.host
        log.warning(
            "upstream %s:%s sent an invalid response to %s %s: %s (answered 502 UPE)",
            getattr(host, "address", "?"), getattr(host, "port", "?"), self.head.method, self.head.path, detail,
        )  # fmt: skip
        self.rt.stats.inc_cluster(self.cstate.cluster.name, "upstream_rq_protocol_error")
        a.end(None, True)
        self.add_flag("UPE")
        if self.phase >= RESPONDING:
            self.reset_downstream()
            return
        self.local_reply(502, (MSG_CONNECT_FAILURE + "protocol error").encode(), "UPE")

    def on_timeout(self) -> None:
        self.timer = None
        if self.phase is DONE:
            return
        self.add_flag("UT")
        a = self.upstream
        if a is not None:
            a.end(None, True)  # a timeout counts against the host (Envoy: 504)
        if self.phase >= RESPONDING:
            self.reset_downstream()
            return
        self.local_reply(504, MSG_TIMEOUT, "UT")

    def attempt_timeout(self, a: UpstreamRequest) -> None:
        if self.phase is not FORWARDING:
            return
        conn = self._drop(a)
        if conn is not None:
            conn.reset_stream(a.sid)
        a.end(None, True)
        if self.try_retry_reset("timeout"):
            return
        self.local_reply(504, MSG_TIMEOUT, "UT")

    # ------------------------------------------------------------------ ending
    def cancel_upstream(self) -> None:
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        a = self.upstream
        if a is not None:
            conn = self._drop(a)
            if a.pending:
                a.pending = False
                self.pool.cancel(a)
            if conn is not None:
                conn.reset_stream(a.sid)
            a.end(None, False, cancel=True)
        if self.in_retry:
            self.in_retry = False
            self.cstate.breaker.end_retry()

    def local_reply(
        self, status: int, body: bytes, flag: str, headers: HeaderList | None = None
    ) -> None:
        if self.phase >= RESPONDING:
            if flag:
                self.add_flag(flag)
            self.reset_downstream()
            return
        self.cancel_upstream()
        if flag:
            self.add_flag(flag)
        if self.grpc:
            self.grpc_local_reply(status, body)
            return
        self.status = status
        self._go(RESPONDED)
        self.resp_bytes = len(body)
        conn = self.conn
        if not conn.closed and conn.transport is not None:
            pairs = list(headers) if headers else []
            if body:
                pairs.append(_TEXT_PLAIN)
            pairs.append((b"content-length", b"%d" % len(body)))
            codec = self.codec
            codec.send_headers(self.sid, ResponseHead(status, pairs, None, True), not body)
            if body:
                if self.head.method == "HEAD":
                    self.resp_bytes = 0  # HEAD: same head, no body (the codec drops it)
                codec.send_data(self.sid, body, True)
            if self.state is not None:
                _stamp_response_end(self.state)
            conn.flush()
        if self.req_done:
            self.finish()

    def grpc_local_reply(self, status: int, body: bytes) -> None:
        """A reply the proxy makes to a gRPC request is gRPC-shaped, as Envoy's: HTTP 200,
        trailers-only, ``grpc-status`` from the HTTP status (or the one a filter chose with
        ``set_state("grpc_status", code)``, e.g. ``fault.abort.grpcStatus``) and
        ``grpc-message`` naming the cause."""
        chosen = self.state.get("grpc_status") if self.state else None
        code = chosen if chosen is not None else grpc.http_to_grpc_status(status)
        self.status = 200
        self.grpc_status = str(code)
        self._go(RESPONDED)
        self.resp_bytes = 0
        conn = self.conn
        if not conn.closed and conn.transport is not None:
            msg = body.decode("utf-8", "replace") or _GRPC_EMPTY_BODY_CAUSE.get(
                status, f"proxy answered HTTP {status}"
            )
            pairs = grpc.local_reply(code, msg)
            self.codec.send_headers(self.sid, ResponseHead(200, pairs, None, False), True)
            if self.state is not None:
                _stamp_response_end(self.state)
            conn.flush()
        if self.req_done:
            self.finish()

    def reset_downstream(self) -> None:
        if self.phase < RESET:
            self._go(RESET)
        self.cancel_upstream()
        self.conn.reset_stream(self.sid)

    def downstream_lost(self) -> None:
        phase = self.phase
        if phase is DONE:
            return
        if phase < RESPONDED:
            self.add_flag("DC")
            self._go(RESET)
        self.cancel_upstream()
        self.finish(notify=False)

    def finish(self, notify: bool = True) -> None:
        phase = self.phase
        if phase is DONE:
            return
        if DONE not in _NEXT[phase]:
            raise IllegalTransition(phase, DONE)
        self.phase = DONE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.upstream is not None or self.retry_timer is not None or self.in_retry:
            self.cancel_upstream()
        rs = self.rs
        if rs is not None and hasattr(rs, "finish"):
            rs.finish()
        v = self.view
        if v is not None:
            flags = "-" if self.flags is None else join_flags(self.flags)
            dur = (_monotonic() - self.t0) * 1000.0
            for f in v.complete:
                if isinstance(f, StatsFilter):  # compiled: a native call, fields read natively
                    f.count(
                        self.peer, self.host, self.cstate, self.grpc, self.grpc_status,
                        self.grpc_msgs, self.status, self.req_bytes, self.resp_bytes, flags, dur,
                    )  # fmt: skip
                else:
                    f.on_complete(self, flags, dur)
        if v is not None:
            v.server["downstream_rq_total"] += 1
        else:
            self.ctx.stats.server["downstream_rq_total"] += 1
        if notify:
            h1 = self.h1
            if h1 is not None:  # compiled: a native call
                h1.stream_done(self)
            else:
                self.conn.stream_done(self)

    # ------------------------------------------------------------------ mirrors
    def _lb(self) -> Any:
        return self.lbctx

    def start_mirrors(self, cr: CompiledRoute) -> None:
        from diktyo.proxy.router.mirror import start_mirror

        ms = []
        head = self.head
        for m in cr.route.mirrors:
            if m.percentage < 100.0 and self.rt.rng.random() * 100 >= m.percentage:
                continue
            ms_ = start_mirror(
                self.rt, m, head, self.path_out, self.out_headers, self.authority, self._lb
            )
            if ms_ is not None:
                if self.req_done:
                    ms_.on_end()
                ms.append(ms_)
        self.mirrors = ms or None


Stream = DownstreamStream  # the name before streams had phases

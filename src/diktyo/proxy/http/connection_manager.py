"""HTTP connection manager: one downstream HTTP/1.1 connection and the streams (requests) on it.

Theory of operation
-------------------
``HttpConnection`` is the asyncio Protocol of a downstream connection. The codec emits request
heads, body chunks and ends; each head becomes a ``Stream``. Pipelined requests are processed
one after the other: only ``streams[0]`` is active, later ones buffer (reading is paused while
more than one is queued).

A ``Stream`` runs the request through the route (fault -> direct response / redirect ->
weighted destination -> header operations and rewrites -> mirrors) and then through attempts:
``ClusterState.pick_host`` -> ``ClusterPool.acquire`` (idle MRU connection, pending queue,
circuit breaker overflow ``UO``) -> ``attach`` (head and buffered body written in one write) ->
response events forwarded with re-framing. Failures before the response started become local
replies with Envoy's status, body and response flag (or a retry per ``RetryState``); failures
after it reset the downstream connection. A reused pooled connection that dies before any
response byte (the keep-alive race) is retried once on a fresh connection, transparently.

No Task per request: everything runs in protocol callbacks; timers use ``loop.call_at`` only
when a timeout is configured. Header/idle timeouts are swept once a second by the sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from diktyo.proxy.codec.http1 import (
    HOP_BY_HOP_STR,
    LAST_CHUNK,
    STATUS_LINES,
    CodecError,
    RequestDecoder,
    RequestHead,
    content_length_header,
    encode_header_block,
    encode_request_head,
    local_response,
    parse_header_block,
    status_line,
    strip_hop_by_hop,
)
from diktyo.proxy.http.policies import LbContext, RetryState, decide_fault
from diktyo.proxy.router.matcher import CompiledDestination, CompiledRoute, RequestInfo
from diktyo.telemetry.istio_metrics import PEER_METADATA_HEADER

if TYPE_CHECKING:
    from diktyo.proxy.http.context import ListenerContext, Runtime

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

RETRY_BUFFER_LIMIT = 1024 * 1024  # body kept for retries (Envoy's default buffer limit)
BUFFER_HIGH_WATER = 64 * 1024  # pause downstream reads while this much waits for upstream

_CHUNKED_HDR = b"transfer-encoding: chunked\r\n"
_CLOSE_HDR = b"connection: close\r\n"
_KEEP_ALIVE_HDR = b"connection: keep-alive\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CONTENT_LENGTH = b"content-length"

# end-to-end headers a client cannot make hop-by-hop by naming them in Connection
_NEVER_HOP_BY_HOP = frozenset({"host"})

MSG_CONNECT_FAILURE = "upstream connect error or disconnect/reset before headers. reset reason: "
MSG_TIMEOUT = b"upstream request timeout"
MSG_NO_HEALTHY = b"no healthy upstream"
MSG_FAULT_ABORT = b"fault filter abort"

# reasons the downstream connection stopped reading (bit mask)
PAUSE_PIPELINE = 1
PAUSE_UPSTREAM = 2
PAUSE_BUFFER = 4

_monotonic = time.monotonic
log = logging.getLogger("diktyo.proxy")
_NO_LB_CONTEXT = LbContext({}, "", None)  # shared by requests whose LB ignores the request


class RequestIds:
    """``x-request-id`` values shaped like UUIDv4: a random 80-bit prefix per process (from the
    injected rng) plus a 48-bit counter. Unique per process, no syscall, ~0.2 us each."""

    __slots__ = ("n", "prefix")

    def __init__(self, rng: Any) -> None:
        h = f"{rng.getrandbits(80):020x}"
        # version 4 and RFC 4122 variant nibbles
        self.prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-"
        self.n = rng.getrandbits(32)

    def next(self) -> str:
        self.n = n = (self.n + 1) & 0xFFFFFFFFFFFF
        return f"{self.prefix}{n:012x}"


def request_id(rng: Any) -> str:
    """One random UUIDv4 string (slow path; the proxy uses ``RequestIds``)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def span_name_for(service: str, port: int | None, authority: str) -> str:
    """Envoy's operation name: ``reviews.default.svc.cluster.local:9080/*``."""
    if service:
        return f"{service}:{port}/*" if port else f"{service}/*"
    return f"{authority}/*"


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


class HttpConnection(asyncio.Protocol):
    """One downstream connection (see module docstring)."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.decoder = RequestDecoder(self, accept_http_10=ctx.sidecar.accept_http_10)
        self.transport: asyncio.Transport | None = None
        self.streams: deque[Stream] = deque()
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.close_after = False
        self.peer = ""
        self.last_activity = 0.0
        self.head_start = 0.0  # arrival of the first byte of the request head being read
        self.requests = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
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
            decoder.feed(data)
        except CodecError as exc:
            error = exc
        if decoder.begun != begun:
            self.head_start = now  # a head began in this read: the header timer starts here
        s = self.streams[0] if self.streams else None
        if s is not None and s.upbuf and s.uconn is not None and s.uconn.transport is not None:
            s.flush_upstream()  # what this read produced for the upstream, in one write
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
            u = self.streams[0].uconn
            if u is not None:
                u.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.streams:
            u = self.streams[0].uconn
            if u is not None:
                u.resume_reading()

    # -- codec sink
    def on_request_head(self, head: RequestHead) -> None:
        self.requests += 1
        s = Stream(self, head)
        self.streams.append(s)
        if len(self.streams) == 1:
            try:  # start_stream(s) inlined: one Python call less per request
                s.start()
            except Exception:  # noqa: BLE001 - a bug costs one request (logged, 500)
                self.internal_error(s)
        else:
            self.pause(PAUSE_PIPELINE)

    def start_stream(self, s: Stream) -> None:
        try:
            s.start()
        except Exception:  # noqa: BLE001 - a bug costs one request (logged, 500)
            self.internal_error(s)

    def internal_error(self, s: Stream) -> None:
        """A bug must cost one request (500), never the connection or process."""
        log.exception("internal error handling %s %s", s.head.method, s.head.path)
        server = self.ctx.stats.server
        server["downstream_rq_internal_error"] = server.get("downstream_rq_internal_error", 0) + 1
        if not s.resp_started:
            s.close_out = True
            s.local_reply(500, b"internal proxy error", "")

    def on_request_body(self, chunk: bytes) -> None:
        self.streams[-1].on_request_body(chunk)

    def on_request_end(self) -> None:
        if self.streams:
            self.streams[-1].on_request_end()

    # -- helpers
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
        self.ctx.stats.server["downstream_rq_total"] += 1
        self.ctx.stats.server[f"downstream_rq_{exc.status}"] = (
            self.ctx.stats.server.get(f"downstream_rq_{exc.status}", 0) + 1
        )
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
            self.transport.write(local_response(exc.status, exc.message.encode(), close=True))
            self.transport.close()
            self.closed = True

    def stream_done(self, s: Stream) -> None:
        if self.streams and self.streams[0] is s:
            self.streams.popleft()
        if self.closed:
            return
        if s.close_out or self.close_after:
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
            return
        if self.decoder.in_head:
            if now - self.head_start > header_timeout:
                self.ctx.stats.server["downstream_rq_header_timeout"] = (
                    self.ctx.stats.server.get("downstream_rq_header_timeout", 0) + 1
                )
                self.transport.write(local_response(408, b"request header timeout", close=True))
                self.transport.close()
                self.closed = True
        elif now - self.last_activity > idle_timeout:
            self.transport.close()
            self.closed = True


class Stream:
    """One request/response exchange on a downstream connection."""

    # Class-level defaults: a new stream only sets what differs per request (no __slots__,
    # so the ~40 fields below cost nothing until a request actually changes them).
    rt: Any = None
    route: CompiledRoute | None = None
    block = 0
    dest: CompiledDestination | None = None
    cstate: Any = None
    pool: Any = None
    host: Any = None
    tried: set[tuple[str, int]] | None = None
    rs: Any = None
    attempt = 1
    uconn: Any = None
    chunks_size = 0
    replayable = True
    req_done = False
    req_bytes = 0
    resp_bytes = 0
    resp_started = False
    resp_done = False
    status = 0
    flags: set[str] | None = None
    timer: asyncio.TimerHandle | None = None
    try_timer: asyncio.TimerHandle | None = None
    retry_timer: asyncio.TimerHandle | None = None
    chunked_out = False
    lbctx: Any = None
    race_retried = False
    done = False
    sent_all = False
    pending = False
    host_active = False
    rq_active = False
    in_retry = False
    reset = False
    mirrors: list[Any] | None = None
    discard = False
    per_try: float | None = None
    span: Any = None  # tracing span (only when the mesh has a trace collector)
    peer_labels: Any = None  # inbound: metric labels from the mTLS peer / peer metadata

    def __init__(self, conn: HttpConnection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.ctx = conn.ctx
        self.t0 = _monotonic()
        self.chunks: list[bytes] = []
        self.close_out = not head.keep_alive
        self.out_headers: dict[str, str] = head.headers
        self.path_out = head.path
        self.upbuf: list[bytes] = []
        self.authority = head.authority
        self.obuf: list[bytes] = []  # response bytes not yet written downstream

    def add_flag(self, flag: str) -> None:
        if self.flags is None:
            self.flags = {flag}
        else:
            self.flags.add(flag)

    # ------------------------------------------------------------------ request side
    def start(self) -> None:
        ctx = self.ctx
        rt = self.rt = ctx.sidecar.rt
        head = self.head
        if head.expect_continue and head.has_body and not self.req_done:
            self.conn.transport.write(_CONTINUE)  # type: ignore[union-attr]
        if ctx.direction == "inbound":
            self.cstate = rt.clusters.get(ctx.cluster)
            if self.cstate is None:
                self.local_reply(503, b"", "NC")
                return
            guard = rt.inbound_guard  # mTLS peer, JWT, RBAC, XFCC (diktyo.proxy.filters.inbound)
            if guard is not None and not guard.check(self):
                return
            self.prepare_headers()
            if rt.tracer is not None:
                self.span = rt.tracer.begin(
                    self.out_headers,
                    "server",
                    span_name_for(rt.inbound_service, ctx.service_port, head.authority),
                    {
                        "http.method": head.method,
                        "http.url": head.path,
                        "node_id": rt.tracer.node_id,
                    },
                )
            self.begin(rt)
            return
        if ctx.direction == "gateway":
            strip_edge_headers(head.headers)
        if rt.gateway_guard is not None and not rt.gateway_guard.check(self):
            return  # a gateway's AuthorizationPolicy / RequestAuthentication answered
        authority = ctx.default_host or head.authority
        self.authority = authority
        matcher = rt.matchers.get(ctx.route_table)
        if matcher is None:
            cvh = None
        else:
            cvh = matcher.by_authority.get(authority) or matcher.find_virtual_host(authority)
        if cvh is None:
            self.local_reply(404, b"", "NR")
            return
        routes = cvh.routes
        if routes and not routes[0].blocks:
            cr = routes[0]  # a match-all first route: no request conditions to evaluate
            self.block = 0
        else:
            info = RequestInfo(
                head.method, head.path, authority, head.headers, head.scheme, ctx.service_port
            )
            for cr, bi, conds in cvh.blocks:  # CompiledRoute.match without a call per route
                for cond in conds:
                    if not cond(info):
                        break
                else:
                    self.block = bi
                    break
            else:
                self.local_reply(404, b"", "NR")
                return
        self.route = cr
        route = cr.route
        if route.fault is not None:
            delay, abort = decide_fault(route.fault, rt.rng)
            if delay is not None and delay > 0:
                self.add_flag("DI")
                self.timer = rt.loop.call_later(delay, self.after_delay, abort)
                return
            if abort is not None:
                self.abort_fault(abort)
                return
        self.route_action()

    def after_delay(self, abort: int | None) -> None:
        self.timer = None
        if self.done or self.resp_started:
            return
        if abort is not None:
            self.abort_fault(abort)
            return
        self.route_action()

    def abort_fault(self, status: int) -> None:
        """Answer a fault abort; telemetry names the route's destination service, as Envoy
        knows the route's cluster before its fault filter runs (no request is started)."""
        cr = self.route
        if cr is not None and cr.route.clusters and self.cstate is None:
            self.cstate = self.rt.clusters.get(cr.route.clusters[0].cluster)
        self.local_reply(status, MSG_FAULT_ABORT, "FI")

    def route_action(self) -> None:
        cr = self.route
        assert cr is not None
        route = cr.route
        rt = self.rt
        if route.direct_response is not None:
            dr = route.direct_response
            hdrs: list[tuple[bytes, bytes]] = []
            if cr.resp_ops:
                hdrs = cr.resp_ops.apply_response(hdrs)
            self.local_reply(dr.status, dr.body.encode(), "", hdrs)
            return
        if route.redirect is not None:
            self.local_reply(
                route.redirect.code, b"", "", [(b"location", self.redirect_location().encode())]
            )
            return
        dest = cr.pick(rt.rng)
        if dest is None:
            self.local_reply(503, b"", "NC")
            return
        self.dest = dest
        self.cstate = rt.clusters.get(dest.wc.cluster)
        if self.cstate is None:
            self.local_reply(503, b"", "NC")
            return
        self.prepare_headers()
        h = self.out_headers
        if rt.peer_header is not None:  # who we are, for the server's telemetry (mesh only)
            h[PEER_METADATA_HEADER] = rt.peer_header
        if cr.has_rewrite:
            rw = route.rewrite
            self.path_out = cr.rewrite_path(self.head.path, self.block)
            if self.path_out != self.head.path:
                h["x-envoy-original-path"] = self.head.path
            if rw is not None and rw.authority:
                h["host"] = rw.authority
        if cr.req_ops:
            cr.req_ops.apply_request(h)
        if dest.req_ops:
            dest.req_ops.apply_request(h)
        if rt.tracer is not None:
            wc = dest.wc
            self.span = rt.tracer.begin(
                h,
                "client",
                span_name_for(wc.host, wc.port or self.cstate.cluster.port or None, self.authority),
                {
                    "http.method": self.head.method,
                    "http.url": self.head.path,
                    "node_id": rt.tracer.node_id,
                },
            )
        if route.mirrors:
            self.start_mirrors(route)
        self.begin(rt)

    def redirect_location(self) -> str:
        rd = self.route.route.redirect  # type: ignore[union-attr]
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
            path = self.route.rewrite_prefix(path, self.block, rd.prefix_rewrite)  # type: ignore[union-attr]  # redirect set here
        return f"{scheme}://{authority}{path}"

    def prepare_headers(self) -> None:
        """Strip hop-by-hop headers (in place), add x-forwarded-*, x-request-id."""
        h = self.head.headers
        if not HOP_BY_HOP_STR.isdisjoint(h):
            conn_hdr = h.get("connection")
            if conn_hdr is not None:
                for t in conn_hdr.split(","):
                    t = t.strip().lower()
                    if t not in _NEVER_HOP_BY_HOP:  # "Connection: host" must not strip Host
                        h.pop(t, None)
            for k in HOP_BY_HOP_STR.intersection(h):
                del h[k]
        peer = self.conn.peer
        if peer:
            xff = h.get("x-forwarded-for")
            h["x-forwarded-for"] = peer if xff is None else f"{xff}, {peer}"
        if "x-request-id" not in h:
            ids = self.rt.request_ids  # RequestIds.next() inlined (hot path)
            ids.n = n = (ids.n + 1) & 0xFFFFFFFFFFFF
            h["x-request-id"] = f"{ids.prefix}{n:012x}"
        if "x-forwarded-proto" not in h:
            h["x-forwarded-proto"] = self.head.scheme
        self.out_headers = h

    def begin(self, rt: Runtime) -> None:
        """Timeouts, retry state, first attempt."""
        route = self.route.route if self.route is not None else None
        timeout = route.timeout if route is not None else None
        ov = self.head.headers.get("x-envoy-upstream-rq-timeout-ms")
        if ov is not None and ov.isdigit():
            timeout = int(ov) / 1000.0
        if timeout:
            self.timer = rt.loop.call_later(timeout, self.on_timeout)
        if route is not None and route.retries is not None:
            self.per_try = route.retries.per_try_timeout
        cs = self.cstate
        self.pool = rt.pools[cs.cluster.name]
        if cs.cluster.lb.consistent_hash is not None:
            self.lbctx = LbContext(self.out_headers, self.conn.peer, None)
        else:
            self.lbctx = _NO_LB_CONTEXT
        self.attempt_upstream(False)

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
        cs = self.cstate
        host = cs.pick_host(self.lbctx, self.tried or frozenset())
        if host is None:
            self.local_reply(503, MSG_NO_HEALTHY, "UH")
            return
        self.host = host
        if self.tried is None:
            self.tried = {host.key}
        else:
            self.tried.add(host.key)
        if not cs.breaker.try_start_request():
            self.local_reply(503, cs.breaker.overflow_message("requests").encode(), "UO")
            return
        self.rq_active = True
        self.pending = True
        self.pool.acquire(self, host, fresh)

    def end_attempt(self, status: int | None, gateway: bool, cancel: bool = False) -> None:
        """The current try is over. ``cancel``: the proxy gave up on it for a reason that is not
        the host's fault (client left, reply already sent): no host stats, no outlier input."""
        if self.rq_active:
            self.rq_active = False
            self.cstate.breaker.end_request()
        if self.host_active:
            self.host_active = False
            if cancel:
                self.cstate.on_request_cancel(self.host)
            else:
                self.cstate.on_request_end(self.host, status, gateway)
        if self.in_retry:
            self.in_retry = False
            self.cstate.breaker.end_retry()
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    # pool callbacks -------------------------------------------------------------
    def attach(self, uconn: Any) -> None:
        self.pending = False
        if self.done or self.resp_done:
            self.pool.release(uconn)
            return
        self.uconn = uconn
        self.cstate.on_request_start(self.host)
        self.host_active = True
        head = self.head
        h = self.out_headers
        h["x-envoy-attempt-count"] = "1" if self.attempt == 1 else str(self.attempt)
        if head.chunked:
            framing = _CHUNKED_HDR
        elif head.content_length is not None:
            framing = content_length_header(head.content_length)
        else:
            framing = b""
        data = encode_request_head(head.method, self.path_out, h, framing)
        if self.chunks:
            data = b"".join([data, *self.chunks])
            if not self.replayable:
                self.chunks = []
                self.chunks_size = 0
        if self.req_done:
            if head.chunked:
                data += LAST_CHUNK
            self.sent_all = True
        if head.method == "HEAD":
            uconn.decoder.expect_no_body()
        uconn.transport.write(data)
        if self.conn.paused & PAUSE_BUFFER:
            self.conn.resume(PAUSE_BUFFER)
        if self.conn.write_paused:
            uconn.pause_reading()
        pt = self.per_try
        if pt:
            self.try_timer = self.rt.loop.call_later(pt, self.on_try_timeout)

    def overflow(self, message: str) -> None:
        self.pending = False
        self.local_reply(503, message.encode(), "UO")

    def connect_failed(self, reason: str) -> None:
        self.pending = False
        # a connect failure counts for the host (outlier detection: gateway error)
        self.cstate.on_request_start(self.host)
        self.host_active = True
        self.end_attempt(None, True)
        if self.try_retry_reset("connect-failure"):
            return
        self.local_reply(503, (MSG_CONNECT_FAILURE + reason).encode(), "UF")

    # request body -----------------------------------------------------------------
    def on_request_body(self, chunk: bytes) -> None:
        self.req_bytes += len(chunk)
        if self.discard or self.resp_done:
            return
        framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.head.chunked else chunk
        if self.mirrors:
            for m in self.mirrors:
                m.on_body(framed)
        u = self.uconn
        if u is not None:
            self.upbuf.append(framed)
            if self.replayable:
                self.chunks.append(framed)
                self.chunks_size += len(framed)
                if self.chunks_size > RETRY_BUFFER_LIMIT:
                    self.replayable = False
                    self.chunks = []
                    self.chunks_size = 0
        else:
            self.chunks.append(framed)
            self.chunks_size += len(framed)
            if self.chunks_size > BUFFER_HIGH_WATER:
                self.conn.pause(PAUSE_BUFFER)
                if self.chunks_size > RETRY_BUFFER_LIMIT:
                    self.replayable = False

    def flush_upstream(self) -> None:
        buf = self.upbuf
        self.upbuf = []
        self.uconn.transport.write(b"".join(buf) if len(buf) > 1 else buf[0])

    def on_request_end(self) -> None:
        self.req_done = True
        if self.mirrors:
            for m in self.mirrors:
                m.on_end()
        if self.resp_done:
            self.finish()
            return
        u = self.uconn
        if u is not None and not self.discard:
            if self.head.chunked:
                self.upbuf.append(LAST_CHUNK)
            self.sent_all = True

    def upstream_pause_writing(self) -> None:
        self.conn.pause(PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.conn.resume(PAUSE_UPSTREAM)

    def downstream_protocol_error(self, exc: CodecError) -> None:
        """Malformed body framing from the client mid-request."""
        self.close_out = True
        self.req_done = True
        if self.uconn is not None:
            u = self.uconn
            self.uconn = None
            u.close()
            self.end_attempt(None, False, cancel=True)
        self.local_reply(exc.status, exc.message.encode(), "")

    # ------------------------------------------------------------------ response side
    def on_response_head(self, status: int, block: bytes, ka: bool) -> None:
        u = self.uconn
        if u is None:
            return  # not ours (anymore)
        u.keep_alive = ka
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if status >= 400 and self.retry_status(status):
            return
        self.resp_started = True
        self.status = status
        head = self.head
        block, has_cl = strip_hop_by_hop(block)
        cr = self.route
        lb = self.lbctx
        if cr is not None and (
            cr.resp_ops or (self.dest is not None and self.dest.resp_ops) or lb.cookie_to_set
        ):
            block = self.response_header_ops(block)
        extra = b""
        if head.method == "HEAD" or status == 204 or status == 304 or has_cl:
            pass
        elif head.version == "1.1":
            extra = _CHUNKED_HDR
            self.chunked_out = True
        else:
            self.close_out = True
        if self.close_out or self.conn.close_after:
            self.close_out = True
            extra += _CLOSE_HDR
        elif head.version == "1.0":
            extra += _KEEP_ALIVE_HDR  # HTTP/1.0 keep-alive must be confirmed
        line = STATUS_LINES.get(status) or status_line(status)
        self.obuf.append(line + block[:-2] + extra + b"\r\n")

    def response_header_ops(self, block: bytes) -> bytes:
        """Route and destination response header operations, and a consistent-hash cookie."""
        out = parse_header_block(block)
        cr = self.route
        if cr is not None and cr.resp_ops:
            out = cr.resp_ops.apply_response(out)
        d = self.dest
        if d is not None and d.resp_ops:
            out = d.resp_ops.apply_response(out)
        lb = self.lbctx
        if lb is not None and lb.cookie_to_set is not None:
            name_, value_, ttl = lb.cookie_to_set
            cookie = (
                f"{name_}={value_}; Max-Age={int(ttl)}; Path=/; HttpOnly"
                if ttl
                else f"{name_}={value_}; Path=/; HttpOnly"
            )
            out.append((b"set-cookie", cookie.encode("latin-1")))
        return encode_header_block(out)

    def retry_status(self, status: int) -> bool:
        if not self.replayable or self.done or self.cstate is None:
            return False
        rs = self.retry_state()
        if not rs.should_retry_status(status, None):
            if getattr(rs, "refused", None) == "limit" and self.attempt > 1:
                self.add_flag("URX")
            return False
        if not self.start_retry():
            return False
        u = self.uconn
        self.uconn = None
        if u is not None:
            u.close()
        self.end_attempt(status, status in (502, 503, 504))
        self.in_retry = True
        self.schedule_retry()
        return True

    def try_retry_reset(self, kind: str) -> bool:
        if not self.replayable or self.resp_started or self.done or self.cstate is None:
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
        if self.done or self.resp_started:
            return
        self.attempt_upstream(False)  # the retry slot is released when this attempt ends

    def on_response_body(self, chunk: bytes) -> None:
        if not self.resp_started or self.uconn is None:
            return
        self.resp_bytes += len(chunk)
        if self.chunked_out:
            self.obuf.append(b"%x\r\n" % len(chunk))
            self.obuf.append(chunk)
            self.obuf.append(b"\r\n")
        else:
            self.obuf.append(chunk)

    def flush_downstream(self) -> None:
        """Write what the last upstream read produced in one write."""
        buf = self.obuf
        if buf:
            self.obuf = []
            t = self.conn.transport
            if t is not None and not self.conn.closed:
                t.write(b"".join(buf) if len(buf) > 1 else buf[0])

    def on_response_end(self) -> None:
        if not self.resp_started or self.uconn is None:
            return
        if self.chunked_out:
            self.obuf.append(LAST_CHUNK)
        buf = self.obuf  # flush_downstream() inlined: one write with what this read produced
        if buf:
            self.obuf = []
            t = self.conn.transport
            if t is not None and not self.conn.closed:
                t.write(b"".join(buf) if len(buf) > 1 else buf[0])
        self.resp_done = True
        status = self.status
        self.end_attempt(status, status == 502 or status == 503 or status == 504)
        u = self.uconn
        self.uconn = None
        if u is not None:
            if self.sent_all and not self.upbuf:
                self.pool.release(u)
            else:
                if self.upbuf and u.transport is not None:
                    self.flush_upstream_to(u)
                if self.sent_all:
                    self.pool.release(u)
                else:
                    u.close()
                    self.discard = True
        if self.req_done:
            self.finish()

    def flush_upstream_to(self, u: Any) -> None:
        buf = self.upbuf
        self.upbuf = []
        u.transport.write(b"".join(buf))

    def on_upstream_lost(self, uconn: Any, reason: str, started: bool) -> None:
        if uconn is not self.uconn:
            return
        self.uconn = None
        self.upbuf = []
        if self.resp_started:
            self.end_attempt(None, True)
            self.add_flag("UC")
            self.reset_downstream()
            return
        self.end_attempt(None, True)
        if (
            uconn.reused
            and not started
            and not self.race_retried
            and self.replayable
            and not self.done
        ):
            # keep-alive race: the pooled connection was closed by the upstream as we reused it
            self.race_retried = True
            self.rt.stats.inc_cluster(self.cstate.cluster.name, "upstream_rq_keepalive_race_retry")
            self.tried = None
            self.attempt_upstream(True)
            return
        if self.try_retry_reset("reset"):
            return
        self.local_reply(503, (MSG_CONNECT_FAILURE + reason).encode(), "UC")

    def on_upstream_protocol_error(self, uconn: Any, detail: str) -> None:
        """The upstream's response broke HTTP/1.1 (a 101 nobody asked for, a head over
        60 KiB, bad framing): Envoy answers 502 with flag ``UPE`` and never forwards it."""
        if uconn is not self.uconn:
            return
        self.uconn = None
        self.upbuf = []
        log.warning(
            "upstream %s:%s sent an invalid response to %s %s: %s (answered 502 UPE)",
            getattr(self.host, "address", "?"), getattr(self.host, "port", "?"), self.head.method, self.head.path, detail,
        )  # fmt: skip
        self.rt.stats.inc_cluster(self.cstate.cluster.name, "upstream_rq_protocol_error")
        self.end_attempt(None, True)
        self.add_flag("UPE")
        if self.resp_started:
            self.reset_downstream()
            return
        self.local_reply(502, (MSG_CONNECT_FAILURE + "protocol error").encode(), "UPE")

    def on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        self.add_flag("UT")
        self.end_attempt(None, True)  # a timeout counts against the host (Envoy: 504)
        if self.resp_started:
            self.reset_downstream()
            return
        self.local_reply(504, MSG_TIMEOUT, "UT")

    def on_try_timeout(self) -> None:
        self.try_timer = None
        if self.done or self.resp_started:
            return
        u = self.uconn
        self.uconn = None
        self.upbuf = []
        if u is not None:
            u.close()
        self.end_attempt(None, True)
        if self.try_retry_reset("timeout"):
            return
        self.local_reply(504, MSG_TIMEOUT, "UT")

    # ------------------------------------------------------------------ ending
    def cancel_upstream(self) -> None:
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.pending:
            self.pending = False
            self.pool.cancel(self)
        u = self.uconn
        if u is not None:
            self.uconn = None
            u.close()
        self.end_attempt(None, False, cancel=True)

    def local_reply(
        self, status: int, body: bytes, flag: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if self.resp_started:
            if flag:
                self.add_flag(flag)
            self.reset_downstream()
            return
        self.cancel_upstream()
        if flag:
            self.add_flag(flag)
        self.status = status
        self.resp_started = True
        self.resp_done = True
        self.resp_bytes = len(body)
        close = self.close_out or self.conn.close_after
        if not self.conn.closed and self.conn.transport is not None:
            data = local_response(status, body, headers, close)
            if self.head.method == "HEAD" and body:
                data = data[: len(data) - len(body)]  # HEAD: same head, no body
                self.resp_bytes = 0
            self.conn.transport.write(data)
        if self.req_done:
            self.finish()

    def reset_downstream(self) -> None:
        self.reset = True
        self.cancel_upstream()
        c = self.conn
        if not c.closed and c.transport is not None:
            c.closed = True
            c.transport.abort()

    def downstream_lost(self) -> None:
        if self.done:
            return
        if not self.reset and not self.resp_done:
            self.add_flag("DC")
        self.cancel_upstream()
        self.finish(notify=False)

    def finish(self, notify: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.pending or self.uconn is not None or self.retry_timer is not None:
            self.cancel_upstream()
        rs = self.rs
        if rs is not None and hasattr(rs, "finish"):
            rs.finish()
        rt = self.rt
        if rt is not None:
            ctx = self.ctx
            flags = "-" if self.flags is None else join_flags(self.flags)
            dur = (_monotonic() - self.t0) * 1000.0
            cs = self.cstate
            host = self.host
            key = (
                ctx.reporter,
                cs.cluster.name if cs is not None else "",
                host.key if host is not None else None,
            )
            labels = self.peer_labels or rt.peers.get(key) or rt.labels_for(ctx.reporter, cs, host)
            rt.record(labels, self.status, flags, dur, self.req_bytes, self.resp_bytes)
            if rt.access_log is not None:
                rt.access_log(self, flags, dur)
            if self.span is not None:
                rt.tracer.end(self.span, self.status, flags, cs.cluster.name if cs else "")
        self.ctx.stats.server["downstream_rq_total"] += 1
        if notify:
            self.conn.stream_done(self)

    # ------------------------------------------------------------------ mirrors
    def start_mirrors(self, route: Any) -> None:
        from diktyo.proxy.router.mirror import start_mirror

        ms = []
        for m in route.mirrors:
            if m.percentage < 100.0 and self.rt.rng.random() * 100 >= m.percentage:
                continue
            ms_ = start_mirror(self, m)
            if ms_ is not None:
                ms.append(ms_)
        self.mirrors = ms or None

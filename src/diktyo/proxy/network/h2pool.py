"""HTTP/2 upstream pool: multiplexed streams on few connections per host, with a stream limit.

Theory of operation
-------------------
Same outside as ``network/pool.py``'s ``ClusterPool`` (``acquire`` / ``cancel`` / ``sweep`` /
``prune`` / ``drain`` / ``retire``...), so the sidecar picks the class per cluster by its
upstream protocol. Inside, the unit handed out is a *stream*, not a connection:

1. ``acquire(req, host)``: the first connection to ``host`` that is usable (no GOAWAY, not
   draining, under ``maxRequestsPerConnection`` streams in its life) and has a free stream
   slot gets the request at once: ``req.attach(handle)`` with an ``H2StreamHandle``, which the
   requester uses like an HTTP/1.1 connection (``handle.codec.new_stream()``, ``send_*``,
   ``handle.write()``; ``pool.release(handle)`` when done). A slot is free while the
   connection's open streams are below ``min(peer's SETTINGS_MAX_CONCURRENT_STREAMS,
   connectionPool.http.maxConcurrentStreams)``. Streams are handed out once the peer's
   SETTINGS arrived (its limit is known): one round trip when a connection opens.
2. Otherwise the request is *pending* (the breaker's ``http1MaxPendingRequests`` bounds the
   queue: overflow -> ``req.overflow(message)``, 503 ``UO``), and a new connection is opened
   when the connections already being opened to that host cannot take all the pending
   requests and the breaker allows one more connection (``maxConnections``).
3. Each released stream slot or established connection serves the pending queue in order.

Circuit breaking counts requests as Envoy does for HTTP/2: the router takes a
``http2MaxRequests`` slot (``breaker.try_start_request``) per attempt before it asks the pool,
whatever the protocol; a connection carries many requests, so ``maxConnections`` rarely binds.

A GOAWAY from the upstream stops new streams on that connection; streams it did not process
get ``on_stream_reset(REMOTE_REFUSED)`` (safe to retry, Envoy retries them on another
connection). A connection without streams closes once it is draining, and after
``idle_timeout`` otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from diktyo.proxy.codec.events import (
    CodecError,
    HeaderList,
    RequestHead,
    ResetReason,
    ResponseHead,
)
from diktyo.proxy.codec.http2_common import DEFAULT_OPTIONS, Http2Options, Http2Stats
from diktyo.proxy.codec.http2_select import codec_description, select_codec
from diktyo.proxy.network.upstream import Requester, dial

if TYPE_CHECKING:
    from diktyo.proxy.codec.http2 import Http2ClientCodec
    from diktyo.proxy.codec.http2_nghttp2 import NgHttp2ClientCodec

log = logging.getLogger("diktyo.proxy")

# what an HTTP/2 pool offers in TLS: "istio-h2" between sidecars (mTLS), plain "h2" to apps
# (``upstream_context`` drops the istio names for SIMPLE/MUTUAL TLS)
H2_ALPN = ("istio-h2", "h2")
# streams per connection before the peer's SETTINGS arrive (RFC 9113 recommends >= 100)
DEFAULT_STREAM_LIMIT = 100
CLOSE_TIMEOUT = 1.0  # s: H2ClusterPool.close_timeout

# Write coalescing for HTTP/2 connections (both directions). While a read callback of an HTTP/2
# connection runs (``write_batch``), ``flush`` only marks its connection dirty; when the outermost
# batch ends, the dirty connections are written once each at the end of this event-loop turn
# (``call_soon``: after every socket this poll found readable has been read, before the loop
# polls again). So one read carrying ten requests makes one write per connection, not one per
# stream (each stream's events used to flush at once), and the reads of ten downstream
# connections in one turn make one write to their shared upstream connection, not ten.
class _Batch:
    """The open batch (compiled: its fields are read natively by both connection classes)."""

    __slots__ = ("depth", "dirty", "loop")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[Any] = []  # connections to write when the batch ends
        self.loop: Any = None  # the loop a _flush_dirty is scheduled on (tests run several)


BATCH: Final = _Batch()


def _flush_dirty() -> None:
    b = BATCH
    b.loop = None
    dirty = b.dirty
    while dirty:
        conns = dirty[:]
        dirty.clear()
        for c in conns:
            c.flush_dirty = False
            c.flush_now()


class write_batch:  # noqa: N801 - used as ``with write_batch():``
    __slots__ = ()

    def __enter__(self) -> None:
        BATCH.depth += 1

    def __exit__(self, *exc: object) -> None:
        b = BATCH
        b.depth -= 1
        if b.depth == 0 and b.dirty:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a codec driven by hand): write now
                _flush_dirty()
                return
            if b.loop is not loop:
                b.loop = loop
                loop.call_soon(_flush_dirty)


def defer_flush(conn: Any) -> bool:
    """True if a batch is open: ``conn.flush_now()`` runs when it ends (once). (The two
    HTTP/2 connection classes inline this with their own typed ``flush_dirty``.)"""
    b = BATCH
    if b.depth:
        if not conn.flush_dirty:
            conn.flush_dirty = True
            b.dirty.append(conn)
        return True
    return False


def _ng_client(codec: Any) -> NgHttp2ClientCodec | None:
    """``codec`` typed when it is libnghttp2's client codec (None for the `h2` one)."""
    from diktyo.proxy.codec.http2_nghttp2 import NgHttp2ClientCodec

    return codec if isinstance(codec, NgHttp2ClientCodec) else None


class H2StreamHandle:
    """One requester's stream on a pooled HTTP/2 connection: what ``attach`` hands out.

    It looks like an HTTP/1.1 ``UpstreamConnection`` to the requester (``codec``, ``write``,
    ``close``, ``pause_reading``, ``reused``...), but ``close`` resets only this stream and
    ``pause_reading`` withholds flow-control credit from this stream only: the other streams
    of the connection go on.

    It is also its own ``codec`` (the connection's codec as this requester sees it:
    ``new_stream`` registers the stream, so that the connection routes that stream's events
    here). No object of a request refers back to another once it is released (the requester
    is dropped then): a proxied HTTP/2 request leaves no reference cycle for the cyclic GC."""

    __slots__ = ("conn", "released", "requester", "reused", "sid", "started")
    protocol = "HTTP/2"
    multiplexed = True

    def __init__(self, conn: H2UpstreamConnection, requester: Any, reused: bool) -> None:
        self.conn = conn
        self.requester = requester  # None once released and its last event delivered
        self.sid = 0  # set by codec.new_stream()
        self.reused = reused
        self.started = False  # response headers received
        self.released = False

    @property
    def codec(self) -> H2StreamHandle:
        return self

    @property
    def closed(self) -> bool:
        return self.released or self.conn.closed

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    @property
    def secure(self) -> bool:
        return self.conn.secure

    @property
    def key(self) -> tuple[str, int]:
        return self.conn.key

    @property
    def keep_alive(self) -> bool:
        return self.conn.codec.keep_alive

    @property
    def max_concurrent_streams(self) -> int:
        return self.conn.codec.max_concurrent_streams

    def write(self) -> None:
        """Write what the codec has queued (one ``transport.write``)."""
        self.conn.flush()

    def flush(self) -> None:  # the same as write (a class-level alias does not compile)
        self.conn.flush()

    def close(self) -> None:
        """Abandon this stream (RST_STREAM CANCEL) and free its slot."""
        self.conn.pool.release(self)

    def reset_stream(self, sid: int) -> None:
        """Abandon this stream (RST_STREAM CANCEL) and free its slot; the connection stays."""
        self.conn.pool.release(self)

    def release(self) -> None:
        self.conn.pool.release(self)

    def pause_reading(self, sid: int = 0) -> None:
        """Withhold this stream's flow-control credit (as a connection: no argument; as a
        codec: this stream's id)."""
        if self.sid:
            self.conn.codec.pause_reading(self.sid)

    def resume_reading(self, sid: int = 0) -> None:
        if self.sid:
            self.conn.codec.resume_reading(self.sid)
            self.conn.flush()  # the WINDOW_UPDATE for what was withheld

    # -- the codec, for this stream
    def new_stream(self) -> int:
        conn = self.conn
        ng = conn.ng
        sid = ng.new_stream() if ng is not None else conn.codec.new_stream()
        self.sid = sid
        conn.requests[sid] = self
        return sid

    def send_headers(self, sid: int, head: RequestHead, end_stream: bool = False) -> None:
        conn = self.conn
        ng = conn.ng
        if ng is not None:  # compiled: a native call
            ng.send_headers(sid, head, end_stream)
        else:
            conn.codec.send_headers(sid, head, end_stream)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        conn = self.conn
        ng = conn.ng
        if ng is not None:  # compiled: a native call
            ng.send_data(sid, data, end_stream)
        else:
            conn.codec.send_data(sid, data, end_stream)

    def send_trailers(self, sid: int, trailers: HeaderList) -> None:
        self.conn.codec.send_trailers(sid, trailers)

    def send_reset(self, sid: int, reason: ResetReason) -> None:
        self.conn.codec.send_reset(sid, reason)

    def acknowledge(self, sid: int, n: int) -> None:
        self.conn.codec.acknowledge(sid, n)

    def data_to_send(self) -> bytes:
        return self.conn.codec.data_to_send()


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to one upstream host; routes codec events to requesters by stream.

    Response DATA is acknowledged (flow-control credit) once handed to the requester; a
    requester that pauses reading (its downstream is slow) withholds it, so the upstream stops
    at its window."""

    def __init__(self, pool: H2ClusterPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        # libnghttp2's codec or h2's: the same interface (typed as the h2 one)
        self.codec: Http2ClientCodec = select_codec()[1](
            self, pool.options, pool.h2stats, pool.loop.time
        )
        # the same codec typed, when it is libnghttp2's: compiled, the calls both ways (codec
        # -> this connection, this connection -> codec) are native instead of generic
        self.ng: NgHttp2ClientCodec | None = _ng_client(self.codec)
        if self.ng is not None:
            self.ng.h2conn = self
        self.requests: dict[int, H2StreamHandle] = {}  # sid -> handle
        self.attaching = 0  # handed out, stream not opened yet
        self.transport: asyncio.Transport | None = None
        self.streams_total = 0
        self.idle_since = 0.0
        self.closed = False
        self.secure = False
        self.stale = False  # settings changed under it: no new stream, close when empty
        self.ready = False  # the peer's SETTINGS arrived: its stream limit is known
        self.write_paused = False
        self._touched: list[H2StreamHandle] | None = None
        self._close_timer: asyncio.TimerHandle | None = None  # close(): abort if not flushed

    # -- capacity
    def stream_limit(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS, capped by the DestinationRule's
        ``connectionPool.http.maxConcurrentStreams`` (Envoy's upstream max_concurrent_streams)."""
        ng = self.ng
        peer = ng.max_concurrent_streams if ng is not None else self.codec.max_concurrent_streams
        pool = self.pool
        if pool.state is not pool.limits_of:
            pool.read_limits()
        return min(peer, pool.stream_cap) if peer else 0

    def usable(self) -> bool:
        ng = self.ng
        pool = self.pool
        if self.closed or self.stale or pool.retired:
            return False
        if ng.closed if ng is not None else self.codec.closed:
            return False
        if pool.state is not pool.limits_of:
            pool.read_limits()
        maxreq = pool.max_requests
        return not (maxreq and self.streams_total >= maxreq)

    def has_slot(self) -> bool:
        return (
            self.ready
            and self.usable()
            and len(self.requests) + self.attaching < self.stream_limit()
        )

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # asyncio hands a BaseTransport; TCP gives a Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.flush()  # connection preface + SETTINGS

    def data_received(self, data: bytes) -> None:
        with write_batch():
            self._data_received(data)

    def _data_received(self, data: bytes) -> None:
        touched: list[H2StreamHandle] = []
        self._touched = touched
        ng = self.ng
        try:
            if ng is not None:  # compiled: a native call
                ng.feed(data)
            else:
                self.codec.feed(data)
        except CodecError as exc:
            self._touched = None
            log.warning(
                "upstream %s:%d (cluster %s): %s; closing the connection",
                self.key[0],
                self.key[1],
                self.pool.name,
                exc.message,
            )
            self.pool.stats.inc_cluster(self.pool.name, "upstream_cx_protocol_error")
            handles = list(self.requests.values())
            self.requests.clear()
            self.close(abort=True)  # (the codec queued its GOAWAY with the error code)
            for h in handles:
                h.released = True
                h.requester.on_upstream_protocol_error(f"HTTP/2: {exc.message}")
                h.requester = None
            return
        self._touched = None
        self.flush()
        if touched:
            if len(touched) == 1:
                h = touched[0]
                r = h.requester
                if r is not None:
                    if isinstance(r, Requester):  # the upstream attempt: a native call
                        r.flush_downstream()
                    else:
                        r.flush_downstream()
                if h.released:
                    h.requester = None  # (release left it for this flush)
            else:
                seen: set[int] = set()
                for h in touched:
                    if id(h) not in seen:
                        seen.add(id(h))
                        r = h.requester
                        if r is None:
                            continue
                        if isinstance(r, Requester):  # the upstream attempt: a native call
                            r.flush_downstream()
                        else:
                            r.flush_downstream()
                for h in touched:
                    if h.released:
                        h.requester = None  # (release left it for this flush)
        if self.codec.closed and not self.requests:
            self.close()
            return
        if not self.ready and self.codec.peer_settings_received:
            self.ready = True  # streams are handed out once the peer's limit is known
            self.pool.serve_all()
        elif self.pool.pending:
            self.pool.serve_all()  # SETTINGS may have raised the stream limit

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        t = self._close_timer
        if t is not None:
            self._close_timer = None
            t.cancel()
        was_closed = self.closed
        self.closed = True
        handles = list(self.requests.values())
        self.requests.clear()
        for h in handles:
            if not h.released:
                h.released = True
                h.requester.on_upstream_lost("connection termination", h.started)
                h.requester = None
        if not was_closed:
            self.pool.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.codec.set_write_paused(True)
        for h in list(self.requests.values()):
            h.requester.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.codec.set_write_paused(False)
        for h in list(self.requests.values()):
            h.requester.upstream_resume_writing()

    # -- ClientSink: events to the requester that owns the stream
    # (the requester is the upstream attempt, a compiled ``Requester``: called natively; a
    # mirror copy the generic way)
    def on_response_headers(self, sid: int, head: ResponseHead) -> None:
        h = self.requests.get(sid)
        if h is not None:
            h.started = True
            if self._touched is not None:
                self._touched.append(h)
            r = h.requester
            if isinstance(r, Requester):
                r.on_response_headers(sid, head)
            else:
                r.on_response_headers(sid, head)

    def on_response_data(self, sid: int, data: bytes) -> None:
        h = self.requests.get(sid)
        if h is not None:
            if self._touched is not None:
                self._touched.append(h)
            r = h.requester
            if isinstance(r, Requester):
                r.on_response_data(sid, data)
            else:
                r.on_response_data(sid, data)
        ng = self.ng  # credit withheld while the stream's reading is paused
        if ng is not None:
            ng.acknowledge(sid, len(data))
        else:
            self.codec.acknowledge(sid, len(data))

    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None:
        h = self.requests.get(sid)
        if h is not None:
            if self._touched is not None:
                self._touched.append(h)
            h.requester.on_response_trailers(sid, trailers)

    def on_response_end(self, sid: int) -> None:
        h = self.requests.get(sid)
        if h is not None:
            if self._touched is not None:
                self._touched.append(h)
            r = h.requester
            if isinstance(r, Requester):
                r.on_response_end(sid)
            else:
                r.on_response_end(sid)

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        h = self.requests.pop(sid, None)
        if h is None or h.released:
            return
        h.released = True
        if reason is ResetReason.REMOTE_REFUSED:
            # not processed by the upstream (REFUSED_STREAM, or above a GOAWAY's last stream):
            # safe to send again, as Envoy does transparently
            h.reused = True
        h.requester.on_upstream_lost(reason.value, h.started)
        h.requester = None
        self.pool.slot_freed(self)

    def on_send_blocked(self, sid: int) -> None:
        h = self.requests.get(sid)
        if h is not None:
            h.requester.upstream_pause_writing()

    def on_send_unblocked(self, sid: int) -> None:
        h = self.requests.get(sid)
        if h is not None:
            h.requester.upstream_resume_writing()

    # -- helpers
    flush_dirty = False

    def flush(self) -> None:
        b = BATCH  # defer_flush(self), inlined: native reads
        if b.depth:
            if not self.flush_dirty:
                self.flush_dirty = True
                b.dirty.append(self)
        else:
            self.flush_now()

    def flush_now(self) -> None:
        t = self.transport
        if t is not None and not self.closed:
            ng = self.ng
            out = ng.data_to_send() if ng is not None else self.codec.data_to_send()
            if out:
                t.write(out)

    def close(self, abort: bool = False) -> None:
        """Stop using this connection: what the codec queued (our GOAWAY) goes out, then the
        socket closes once the transport has written everything it holds (TCP FIN, TLS
        close_notify), bounded by the pool's ``close_timeout``. ``abort`` (a protocol error):
        reset at once, as Envoy closes a connection on a codec error."""
        if self.closed:
            return
        handles = list(self.requests.values())
        self.requests.clear()
        self.closed = True
        t = self.transport
        if t is not None:
            self.flush_goaway()
            if abort:
                t.abort()
            else:
                t.close()
                # a peer that stopped reading would hold the socket open: abort it then
                self._close_timer = self.pool.loop.call_later(self.pool.close_timeout, t.abort)
        for h in handles:
            if not h.released:
                h.released = True
                h.requester.on_upstream_lost("connection termination", h.started)
                h.requester = None
        self.pool.connection_closed(self)

    def flush_goaway(self) -> None:
        t = self.transport
        if t is not None:
            out = self.codec.data_to_send()
            if out:
                t.write(out)

    def drain(self) -> None:
        """No new streams; send GOAWAY(NO_ERROR) and close when the last stream is done."""
        self.stale = True
        if not self.requests:
            self.codec.goaway()
            self.close()


class H2ClusterPool:
    """All HTTP/2 upstream connections of one cluster (survives snapshot swaps)."""

    protocol = "HTTP/2"

    def __init__(
        self,
        name: str,
        state: Any,
        loop: asyncio.AbstractEventLoop,
        stats: Any,
        tasks: set[asyncio.Task[Any]],
        options: Http2Options = DEFAULT_OPTIONS,
        max_streams_per_connection: int = 2**31 - 1,
    ) -> None:
        self.name = name
        self.state = state
        self.loop = loop
        self.stats = stats
        self.tasks = tasks
        self.options = options
        self.max_streams_per_connection = max_streams_per_connection
        self.h2stats = Http2Stats()
        # load the HTTP/2 codec now (libnghttp2 + cffi's declaration parse: ~0.1 s), not on the
        # first request: it would stall that request and every one queued behind it
        select_codec()
        self.conns: dict[tuple[str, int], list[H2UpstreamConnection]] = {}
        self.connecting: dict[tuple[str, int], int] = {}
        self.pending: deque[tuple[Any, Any]] = deque()  # (request, host)
        self.active: set[H2UpstreamConnection] = set()  # every established connection
        self.retired = False
        self.certs: Any = None
        self.generation = 0
        # a retired connection's transport gets this long to write out what it holds (requests
        # already answered, our GOAWAY) before it is reset (Envoy's delayed_close_timeout: 1 s)
        self.close_timeout = CLOSE_TIMEOUT
        # the cluster's per-connection limits, read once per cluster state (a snapshot swap
        # replaces ``state``): compiled, two native reads per acquire instead of six generic
        self.limits_of: Any = None
        self.stream_cap = 0
        self.max_requests = 0

    def read_limits(self) -> None:
        cp = self.state.cluster.pool
        self.stream_cap = cp.max_concurrent_streams or self.max_streams_per_connection
        self.max_requests = cp.max_requests_per_connection or 0
        self.limits_of = self.state

    # -- acquiring
    def acquire(self, req: Any, host: Any, fresh: bool = False) -> None:
        """Give ``req`` a stream to ``host`` now, or queue it. ``fresh`` is accepted for the
        HTTP/1 pool's signature; streams need no fresh connection (a refused stream is
        retried on whichever connection has room)."""
        del fresh
        for conn in self.conns.get(host.key, ()):
            if conn.has_slot():
                self._hand(conn, req)
                return
        breaker = self.state.breaker
        if not breaker.try_enter_pending():
            self.stats.inc_cluster(self.name, "upstream_rq_pending_overflow")
            req.overflow(breaker.overflow_message("pending"))
            return
        self.pending.append((req, host))
        self._maybe_open(host)

    def _maybe_open(self, host: Any) -> None:
        """Open a connection to ``host`` unless those being opened (or set up, waiting for the
        peer's SETTINGS) can take every pending request for it."""
        key = host.key
        waiting = sum(1 for _, h in self.pending if h.key == key)
        coming = self.connecting.get(key, 0) * DEFAULT_STREAM_LIMIT
        coming += sum(
            DEFAULT_STREAM_LIMIT for c in self.conns.get(key, ()) if not c.ready and c.usable()
        )
        if waiting > coming and self.state.breaker.can_open_connection():
            self._open(host)

    def cancel(self, req: Any) -> None:
        for i, (r, _) in enumerate(self.pending):
            if r is req:
                del self.pending[i]
                self.state.breaker.leave_pending()
                return

    def _open(self, host: Any) -> None:
        self.state.breaker.connection_opened()
        self.connecting[host.key] = self.connecting.get(host.key, 0) + 1
        self.stats.inc_cluster(self.name, "upstream_cx_total")
        self.stats.inc_cluster(self.name, "upstream_cx_http2_total")
        task = self.loop.create_task(self._connect(host))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, host: Any) -> None:
        conn, error = await dial(self, host, lambda: H2UpstreamConnection(self, host.key), H2_ALPN)
        if conn is not None:
            self._connecting_done(host.key)
            self.conns.setdefault(host.key, []).append(conn)
            self.active.add(conn)
            conn.idle_since = self.loop.time()
            if conn.ready:
                self.serve_all()
            return
        self._connecting_done(host.key)
        self.state.breaker.connection_closed()
        self._fail_pending(host.key, error)

    def _fail_pending(self, key: tuple[str, int], error: str) -> None:
        """A connection meant for the pending requests of ``key`` failed: fail as many as it
        would have carried (others wait for their own connection)."""
        failed = 0
        for item in list(self.pending):
            if item[1].key == key and failed < DEFAULT_STREAM_LIMIT:
                self.pending.remove(item)
                self.state.breaker.leave_pending()
                item[0].connect_failed(error)
                failed += 1
        self.serve_all()

    def _connecting_done(self, key: tuple[str, int]) -> None:
        n = self.connecting.get(key, 0) - 1
        if n > 0:
            self.connecting[key] = n
        else:
            self.connecting.pop(key, None)

    def _hand(self, conn: H2UpstreamConnection, req: Any) -> None:
        handle = H2StreamHandle(conn, req, False)
        conn.streams_total += 1
        conn.attaching += 1
        try:
            # the requester opens its stream (codec.new_stream) in there
            if isinstance(req, Requester):  # the upstream attempt: a native call
                req.attach(handle)  # type: ignore[arg-type]  # the handle is the requester's connection (as the generic call below)
            else:
                req.attach(handle)
        finally:
            conn.attaching -= 1

    def serve(self, conn: H2UpstreamConnection) -> None:
        """Hand pending requests for ``conn``'s host to it while it has free slots."""
        if not self.pending:
            return
        i = 0
        while i < len(self.pending) and conn.has_slot():
            req, host = self.pending[i]
            if host.key == conn.key:
                del self.pending[i]
                self.state.breaker.leave_pending()
                self._hand(conn, req)
            else:
                i += 1

    def serve_all(self) -> None:
        """Serve the pending queue from every connection with room; open connections for
        what is left."""
        if not self.pending:
            return
        for conns in list(self.conns.values()):
            for c in conns:
                self.serve(c)
        seen: set[tuple[str, int]] = set()
        for _, host in list(self.pending):
            if host.key not in seen:
                seen.add(host.key)
                self._maybe_open(host)

    # -- releasing
    def release(self, handle: H2StreamHandle) -> None:
        """The requester is done with its stream: reset it if still open (no-op once ended
        both ways) and free the slot. Idempotent."""
        if handle.released:
            return
        handle.released = True
        conn = handle.conn
        if handle.sid and conn.requests.pop(handle.sid, None) is not None and not conn.closed:
            ng = conn.ng
            if ng is not None:
                ng.send_reset(handle.sid, ResetReason.LOCAL_RESET)
            else:
                conn.codec.send_reset(handle.sid, ResetReason.LOCAL_RESET)
            conn.flush()
        if conn._touched is None:
            # the requester and its handle refer to each other: dropping this side leaves no
            # cycle for the cyclic GC. During a read, once the read's downstream flush is done.
            handle.requester = None
        self.slot_freed(conn)

    def slot_freed(self, conn: H2UpstreamConnection) -> None:
        if conn.closed:
            return
        if not conn.requests:
            conn.idle_since = self.loop.time()
            if not conn.usable():
                conn.drain()
                return
        if self.pending:
            self.serve_all()

    def connection_closed(self, conn: H2UpstreamConnection) -> None:
        if not conn.ready and self.pending:
            # it never became usable (no SETTINGS): the pending requests it was for fail now
            self.loop.call_soon(
                self._fail_pending,
                conn.key,
                "upstream did not speak HTTP/2 (no SETTINGS before the connection closed); "
                "check the port's protocol (name/appProtocol) and the DestinationRule's "
                "h2UpgradePolicy",
            )
        self.active.discard(conn)
        conns = self.conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.conns[conn.key]
            self.state.breaker.connection_closed()
            self.stats.inc_cluster(self.name, "upstream_cx_destroy")
        if self.pending:
            self.loop.call_soon(self.serve_all)

    # -- maintenance (same names as ClusterPool)
    def sweep(self, now: float) -> None:
        timeout = self.state.cluster.pool.idle_timeout
        for conns in list(self.conns.values()):
            for c in list(conns):
                if not c.requests and now - c.idle_since > timeout:
                    c.drain()

    def prune(self, keys: set[tuple[str, int]]) -> None:
        for key in [k for k in self.conns if k not in keys]:
            for c in list(self.conns.get(key, ())):
                c.drain()

    def retune_tls(self, secure_for: Any) -> None:
        for conns in list(self.conns.values()):
            for c in list(conns):
                want = secure_for(c.key)
                if want is not None and c.secure != want:
                    c.drain()

    def drain(self, reason: str) -> int:
        self.generation += 1
        n = 0
        for conns in list(self.conns.values()):
            for c in list(conns):
                if not c.stale:
                    n += 1
                    c.drain()
        if n:
            self.stats.inc_cluster(self.name, "upstream_cx_pool_drained", n)
        return n

    def retire(self) -> None:
        self.retired = True
        self.close_all()

    def close_all(self) -> None:
        for conns in list(self.conns.values()):
            for c in list(conns):
                c.drain()

    @property
    def idle(self) -> dict[tuple[str, int], list[H2UpstreamConnection]]:
        """Established connections without an open stream, per host."""
        return {k: [c for c in v if not c.requests] for k, v in self.conns.items()}

    @property
    def codec(self) -> str:
        """The HTTP/2 codec this process runs, e.g. ``nghttp2 1.52.0 (cffi API)`` or ``h2 4.4.1``."""
        return codec_description()

    def describe(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "codec": self.codec,
            "connections": {
                f"{k[0]}:{k[1]}": [len(c.requests) for c in v] for k, v in self.conns.items()
            },
            "pending": len(self.pending),
            "http2": self.h2stats.as_dict(),
        }

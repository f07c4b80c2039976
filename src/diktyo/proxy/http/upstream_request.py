"""One upstream attempt of a downstream stream (Envoy's ``UpstreamRequest``).

Theory of operation
-------------------
A stream that goes upstream creates an ``UpstreamRequest`` per try: the first attempt, each
retry, and the transparent re-send after a keep-alive race are separate objects. The attempt
is what the pool and the connection know (``network.upstream.UpstreamCallbacks``): it is
queued as *pending*, gets a connection (``attach``) or fails (``overflow``,
``connect_failed``), and receives the response events, losses and protocol errors of its
connection, and its per-try timeout.

When the stream is done with an attempt (response complete, retry, timeout, reset, local
reply) it calls ``detach()``: from then on every callback of that attempt - a late response
byte, a connection closing, a per-try timer already queued in the loop - is dropped at the
attempt, before it can reach the stream. The stream never compares connections to find out
whether an event is still meant for it.

The attempt also owns its accounting, released exactly once by ``end``: the circuit
breaker's active request, the host's active request and outlier input, and the retry slot
of a retried attempt.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from diktyo.proxy.codec.events import HeaderList, ResetReason, ResponseHead
from diktyo.proxy.network.upstream import Requester

if TYPE_CHECKING:
    from diktyo.proxy.http.connection_manager import DownstreamStream
    from diktyo.proxy.network.upstream import UpstreamConnectionLike
    from diktyo.proxy.upstream.cluster import ClusterState
    from diktyo.proxy.upstream.host import Host


class UpstreamRequest(Requester):
    """One try of one request against one upstream host. A ``Requester`` (a compiled
    class): the pool, the connection and the HTTP/1.1 codec call it natively."""

    def __init__(self, stream: DownstreamStream, host: Any, attempt: int, retry_slot: bool) -> None:
        # every field set here, none as a class-level default: mypyc leaves a class-level
        # default of a type from another compiled module (the connection Protocol) unset
        # typed (not Any): compiled, the stream's callbacks below are native calls
        self.stream: DownstreamStream | None = stream  # None: detached
        # typed (not Any): compiled, the host and cluster state are read and called natively
        self.host: Host = host
        self.cstate: ClusterState = stream.cstate
        self.pool = stream.pool
        self.attempt = attempt
        self.retry_slot = retry_slot  # this attempt is a retry and holds a retry slot
        self.conn: UpstreamConnectionLike | None = None
        self.sid = 0
        self.pending = False
        self.rq_active = True  # the breaker admitted it (the stream checked before creating it)
        self.host_active = False
        self.sent_all = False  # the whole request (end of stream included) was encoded
        self.try_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ stream side
    def detach(self) -> None:
        """The stream is done with this attempt: later callbacks are dropped here."""
        self.stream = None
        t = self.try_timer
        if t is not None:
            self.try_timer = None
            t.cancel()

    def end(self, status: int | None, gateway: bool, cancel: bool = False) -> None:
        """The try is over (idempotent). ``cancel``: the proxy gave up on it for a reason that
        is not the host's fault (client left, reply already sent): no host stats, no outlier
        input."""
        cs = self.cstate
        if self.rq_active:
            self.rq_active = False
            cs.breaker.end_request()
        if self.host_active:
            self.host_active = False
            if cancel:
                cs.on_request_cancel(self.host)
            else:
                cs.on_request_end(self.host, status, gateway)
        if self.retry_slot:
            self.retry_slot = False
            cs.breaker.end_retry()
        t = self.try_timer
        if t is not None:
            self.try_timer = None
            t.cancel()

    def start_try_timer(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.try_timer = loop.call_later(timeout, self.on_try_timeout)

    # ------------------------------------------------------------------ pool callbacks
    def attach(self, conn: UpstreamConnectionLike) -> None:
        self.pending = False
        s = self.stream
        if s is None:
            self.pool.release(conn)  # the stream gave up while this try waited for a connection
            return
        self.conn = conn
        self.host.active_requests += 1  # self.cstate.on_request_start(self.host) inlined
        self.cstate.retry_budget.active_requests += 1
        self.host_active = True
        s.attempt_attached(self)

    def overflow(self, message: str) -> None:
        self.pending = False
        s = self.stream
        if s is not None:
            s.attempt_overflow(self, message)

    def connect_failed(self, reason: str) -> None:
        self.pending = False
        s = self.stream
        if s is not None:
            # a connect failure counts for the host (outlier detection: gateway error)
            self.cstate.on_request_start(self.host)
            self.host_active = True
            s.attempt_connect_failed(self, reason)

    # ------------------------------------------------------------------ connection callbacks
    def on_response_headers(self, sid: int, head: ResponseHead) -> None:
        s = self.stream
        if s is not None:
            s.upstream_headers(self, head)

    def on_response_data(self, sid: int, data: bytes) -> None:
        s = self.stream
        if s is not None:
            s.upstream_data(self, data)

    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None:
        s = self.stream
        if s is not None:
            s.upstream_trailers(self, trailers)

    def on_response_end(self, sid: int) -> None:
        s = self.stream
        if s is not None:
            s.upstream_end(self)

    def on_upstream_lost(self, reason: str, started: bool) -> None:
        s = self.stream
        if s is not None:
            s.upstream_lost(self, reason, started)

    def on_stream_reset(self, sid: int, reason: ResetReason) -> None:
        # the codec reset this stream (HTTP/2 RST_STREAM, GOAWAY): as if its connection went
        self.on_upstream_lost(reason.value, True)

    def on_send_blocked(self, sid: int) -> None:
        self.upstream_pause_writing()

    def on_send_unblocked(self, sid: int) -> None:
        self.upstream_resume_writing()

    def on_upstream_protocol_error(self, detail: str) -> None:
        s = self.stream
        if s is not None:
            s.upstream_protocol_error(self, detail)

    def on_try_timeout(self) -> None:
        self.try_timer = None
        s = self.stream
        if s is not None:
            s.attempt_timeout(self)

    def upstream_pause_writing(self) -> None:
        s = self.stream
        if s is not None:
            s.upstream_write_paused(True)

    def upstream_resume_writing(self) -> None:
        s = self.stream
        if s is not None:
            s.upstream_write_paused(False)

    def flush_downstream(self) -> None:
        s = self.stream
        if s is not None:
            h1 = s.h1
            if h1 is not None:  # compiled: a native call
                h1.flush()
            else:
                s.conn.flush()

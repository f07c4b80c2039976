"""The downstream stream's lifecycle without sockets: a Hypothesis state machine drives one
``DownstreamStream`` through random orders of request data, pool outcomes, upstream response
events (also from attempts the stream already gave up on), resets, timers (route timeout,
per-try timeout, retry backoff) and client disconnects, and checks the stream's invariants.

Real parts: the stream, its phases, ``UpstreamRequest``, the route matcher, ``ClusterState``
(breaker, hosts, retry state) and the HTTP/1 client codec. Stand-ins: the downstream
connection/codec (records what the stream encodes), the pool (the test decides when and how
it answers) and the event loop's timers (the test decides which one fires)."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from diktyo import _build
from diktyo.core.clock import ManualClock
from diktyo.proxy.codec.events import RequestHead, ResponseHead
from diktyo.proxy.codec.http1 import Http1ClientCodec
from diktyo.proxy.filters.contract import CONTINUE, STOP, FilterChain, FilterStatus, HttpFilter
from diktyo.proxy.filters.telemetry import StatsFilter
from diktyo.proxy.http.connection_manager import DownstreamStream, RequestIds
from diktyo.proxy.http.phases import DONE, RESET, TRANSITIONS, IllegalTransition, Phase
from diktyo.proxy.http.phases import check_transition as check
from diktyo.proxy.http.upstream_request import UpstreamRequest
from diktyo.proxy.router.matcher import RouteMatcher
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.testing import http_snapshot

ATTEMPTS = 2  # route retries.attempts


# white-box: duck-typed fakes (Stats, Runtime, ...) and a DownstreamStream subclass, which the
# mypyc build's type checks and native classes refuse; `make test-pure` runs it on the sources
if _build.status()["compiled"]:
    pytest.skip(
        "white-box test of the pure sources (fakes, a DownstreamStream subclass) the compiled "
        "build refuses; `make test-pure` (DIKTYO_PURE=1) runs it",
        allow_module_level=True,
    )


class Handle:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    def run(self) -> None:
        self.fired = True
        self.fn(*self.args)


class Timers:
    """``loop.call_later`` whose timers fire when the test says so."""

    def __init__(self) -> None:
        self.handles: list[Handle] = []

    def call_later(self, delay: float, fn: Any, *args: Any) -> Handle:
        h = Handle(fn, args)
        self.handles.append(h)
        return h

    def live(self) -> list[Handle]:
        return [h for h in self.handles if not h.cancelled and not h.fired]


class Stats:
    def __init__(self) -> None:
        self.server: dict[str, int] = defaultdict(int)
        self.cluster: dict[tuple[str, str], int] = defaultdict(int)

    def inc_cluster(self, name: str, key: str, n: int = 1) -> None:
        self.cluster[(name, key)] += n


class UpConn:
    """A pooled upstream connection: the real HTTP/1 client codec, no socket."""

    def __init__(self, reused: bool) -> None:
        self.codec = Http1ClientCodec(self)  # type: ignore[arg-type]  # events go nowhere here
        self.reused = reused
        self.closed = False
        self.written = b""

    def write(self) -> None:
        self.written += self.codec.data_to_send()

    def reset_stream(self, sid: int) -> None:
        self.closed = True  # HTTP/1.1: abandoning the stream closes the connection

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Pool:
    def __init__(self) -> None:
        self.pending: list[UpstreamRequest] = []
        self.attempts: list[UpstreamRequest] = []
        self.released: list[UpConn] = []

    def acquire(self, a: UpstreamRequest, host: Any, fresh: bool = False) -> None:
        self.attempts.append(a)
        self.pending.append(a)

    def cancel(self, a: UpstreamRequest) -> None:
        self.pending.remove(a)

    def release(self, conn: UpConn) -> None:
        self.released.append(conn)


class Codec:
    """The downstream codec: records what the stream encodes."""

    def __init__(self) -> None:
        self.heads: list[int] = []
        self.ends = 0
        self.calls = 0
        self.continues = 0

    def send_headers(self, sid: int, head: ResponseHead, end_stream: bool = False) -> None:
        self.calls += 1
        self.heads.append(head.status)
        self.ends += end_stream

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.calls += 1
        self.ends += end_stream

    def send_trailers(self, sid: int, trailers: Any) -> None:
        self.calls += 1
        self.ends += 1


class Runtime:
    def __init__(self, snapshot: Any, pool: Pool, timers: Timers) -> None:
        rng = random.Random(7)
        self.loop = timers
        self.rng = rng
        self.stats = Stats()
        self.request_ids = RequestIds(rng)
        self.matchers = {t.name: RouteMatcher(t) for t in snapshot.route_tables}
        self.clusters = {
            c.name: ClusterState(c, ManualClock(), rng, retry_budget_percent=100.0)
            for c in snapshot.clusters
        }
        self.pools = dict.fromkeys(self.clusters, pool)
        self.filter_chains: dict[Any, Any] = {}
        self.access_log = None
        self.inbound_guard = None
        self.gateway_guard = None
        self.tracer = None
        self.peers: dict[Any, Any] = {}
        self.peer_header = None
        self.inbound_service = ""
        self.records: list[tuple[Any, ...]] = []
        self.sidecar = self

    @property
    def rt(self) -> Runtime:
        return self

    def labels_for(self, reporter: str, cstate: Any, host: Any) -> str:
        return "labels"

    def record(self, *args: Any) -> None:
        self.records.append(args)


class Ctx:
    direction = "outbound"
    reporter = "source"
    route_table = "outbound"
    cluster = ""
    default_host = ""
    service_port = 0

    def __init__(self, rt: Runtime) -> None:
        self.sidecar = rt
        self.stats = rt.stats
        self.connections: set[Any] = set()


class Conn:
    """The downstream connection as a stream sees it."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.codec = Codec()
        self.peer = "10.0.0.1"
        self.closed = False
        self.transport = object()
        self.paused = 0
        self.write_paused = False
        self.close_after = False
        self.resets = 0
        self.done: list[DownstreamStream] = []
        self.errors: list[BaseException] = []

    def flush(self) -> None:
        pass

    def send_continue(self, sid: int) -> None:
        self.codec.continues += 1

    def reset_stream(self, sid: int) -> None:
        self.resets += 1
        self.closed = True

    def tls_peer(self) -> tuple[str, bytes | None]:
        return "", None

    def pause(self, reason: int) -> None:
        self.paused |= reason

    def resume(self, reason: int) -> None:
        self.paused &= ~reason

    def internal_error(self, s: DownstreamStream) -> None:
        raise AssertionError("internal error in the stream")

    def stream_done(self, s: DownstreamStream) -> None:
        self.done.append(s)


def snapshot(timeout: float | None, per_try: float | None) -> Any:
    route = {
        "name": "r",
        "clusters": [{"cluster": "outbound|80||reviews", "host": "reviews"}],
        "retries": {
            "attempts": ATTEMPTS,
            "per_try_timeout": per_try,
            "retry_on": ["5xx", "reset", "connect-failure"],
        },
    }
    if timeout:
        route["timeout"] = timeout
    return http_snapshot(
        {"reviews": [("10.1.0.1", 9080), ("10.1.0.2", 9080), ("10.1.0.3", 9080)]},
        routes={"reviews": [route]},
    )


def request(body: bool) -> RequestHead:
    h = RequestHead({"host": "reviews"})
    h.authority = "reviews"
    h.path = "/r"
    if body:
        h.method = "POST"
        h.has_body = True
        h.chunked = True
        h.headers["transfer-encoding"] = "chunked"
    return h


class TracedStream(DownstreamStream):
    """Records every phase the stream enters (also where the hot path assigns it inline)."""

    def __init__(self, *args: Any) -> None:
        self.trace: list[Phase] = [DownstreamStream.phase]
        super().__init__(*args)

    @property  # type: ignore[override]  # a recording property over the plain attribute
    def phase(self) -> Phase:
        return self.trace[-1]

    @phase.setter
    def phase(self, new: Phase) -> None:
        self.trace.append(new)


class StreamMachine(RuleBasedStateMachine):
    @initialize(
        body=st.booleans(),
        timeout=st.sampled_from([None, 5.0]),
        per_try=st.sampled_from([None, 1.0]),
    )
    def start(self, body: bool, timeout: float | None, per_try: float | None) -> None:
        self.timers = Timers()
        self.pool = Pool()
        self.rt = Runtime(snapshot(timeout, per_try), self.pool, self.timers)
        self.conn = Conn(Ctx(self.rt))
        self.body = body
        self.s = TracedStream(self.conn, 1, request(body))
        self.history = self.s.trace
        self.calls_at_done: int | None = None
        self.s.start()
        if not body:
            self.s.decode_end()

    # ------------------------------------------------------------------ client
    @precondition(lambda self: self.body and not self.s.req_done and not self.conn.closed)
    @rule(size=st.integers(1, 3000))
    def request_data(self, size: int) -> None:
        self.s.decode_data(b"x" * size)

    @precondition(lambda self: self.body and not self.s.req_done and not self.conn.closed)
    @rule()
    def request_trailers(self) -> None:
        self.s.decode_trailers([(b"x-checksum", b"1")])

    @precondition(lambda self: not self.s.req_done and not self.conn.closed)
    @rule()
    def request_end(self) -> None:
        self.s.decode_end()

    @precondition(lambda self: not self.conn.closed)
    @rule()
    def client_disconnects(self) -> None:
        self.conn.closed = True
        self.s.downstream_lost()

    @rule()
    def nothing_new(self) -> None:
        """(always possible: lets the invariants run on a quiet stream)"""

    # ------------------------------------------------------------------ pool
    @precondition(lambda self: self.pool.pending)
    @rule(reused=st.booleans())
    def pool_attaches(self, reused: bool) -> None:
        self.pool.pending.pop(0).attach(UpConn(reused))  # type: ignore[arg-type]

    @precondition(lambda self: self.pool.pending)
    @rule()
    def pool_overflows(self) -> None:
        self.pool.pending.pop(0).overflow("upstream connect error or disconnect/reset")

    @precondition(lambda self: self.pool.pending)
    @rule()
    def connect_fails(self) -> None:
        self.pool.pending.pop(0).connect_failed("connection refused")

    # ------------------------------------------------------------------ upstream (any attempt,
    # the stream's current one or one it gave up on: late callbacks must be harmless)
    def attached(self) -> list[UpstreamRequest]:
        return [a for a in self.pool.attempts if a.sid]

    @precondition(lambda self: self.attached())
    @rule(data=st.data(), status=st.sampled_from([200, 404, 500, 503]))
    def response_headers(self, data: st.DataObject, status: int) -> None:
        a = data.draw(st.sampled_from(self.attached()))
        a.on_response_headers(a.sid, ResponseHead(status, raw=b"\r\n"))

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def response_data(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.attached()))
        a.on_response_data(a.sid, b"hello")

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def response_trailers(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.attached()))
        a.on_response_trailers(a.sid, [(b"grpc-status", b"0")])

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def response_end(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.attached()))
        a.on_response_end(a.sid)

    @precondition(lambda self: self.attached())
    @rule(data=st.data(), started=st.booleans())
    def upstream_resets(self, data: st.DataObject, started: bool) -> None:
        a = data.draw(st.sampled_from(self.attached()))
        a.on_upstream_lost("connection termination", started)

    @precondition(lambda self: self.attached())
    @rule(data=st.data())
    def upstream_protocol_error(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.attached()))
        a.on_upstream_protocol_error("unexpected 101")

    # ------------------------------------------------------------------ time
    @precondition(lambda self: self.timers.live())
    @rule(data=st.data())
    def a_timer_fires(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.timers.live())).run()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def phases_only_move_forward_along_the_table(self) -> None:
        trace = self.history
        assert trace[-1] is self.s.phase
        for a, b in itertools.pairwise(trace):
            assert b in TRANSITIONS[a] and b > a, f"{a.name} -> {b.name}"

    @invariant()
    def at_most_one_response_start(self) -> None:
        assert len(self.conn.codec.heads) <= 1
        assert self.conn.codec.ends <= 1

    @invariant()
    def nothing_happens_after_done(self) -> None:
        s = self.s
        if s.phase is DONE:
            calls = self.conn.codec.calls
            if self.calls_at_done is None:
                self.calls_at_done = calls
            assert calls == self.calls_at_done, "the stream encoded after it was done"
            assert len(self.rt.records) == 1, "stats recorded once"
            assert len(self.conn.done) <= 1
            assert s.upstream is None
            assert not self.timers.live() or all(
                h.fn.__self__ is not s for h in self.timers.live() if hasattr(h.fn, "__self__")
            ), "a stream timer is still armed after DONE"
        else:
            assert not self.rt.records
            assert not self.conn.done

    @invariant()
    def only_the_current_attempt_is_attached(self) -> None:
        for a in self.pool.attempts:
            if a is not self.s.upstream:
                assert a.stream is None, "an abandoned attempt still reaches the stream"
                assert not a.rq_active and not a.host_active and not a.retry_slot

    @invariant()
    def attempt_counts(self) -> None:
        s = self.s
        numbers = [a.attempt for a in self.pool.attempts]
        # the first try and ATTEMPTS retries, numbered 1, 2, 3...; plus at most one transparent
        # re-send after a keep-alive race, which keeps its try's number
        assert sorted(set(numbers)) == list(range(1, len(set(numbers)) + 1))
        assert len(set(numbers)) <= 1 + ATTEMPTS
        assert len(numbers) - len(set(numbers)) <= 1
        assert max(numbers, default=1) <= s.attempt <= 1 + ATTEMPTS
        for a in self.pool.attempts:
            if a.conn is not None:  # the attempt count went upstream with each try
                assert b"x-envoy-attempt-count: %d\r\n" % a.attempt in a.conn.written

    @invariant()
    def resources_released_when_done(self) -> None:
        if self.s.phase is not DONE:
            return
        cs = self.rt.clusters["outbound|80||reviews"]
        assert cs.breaker.requests == 0
        assert cs.breaker.retries == 0
        assert all(h.active_requests == 0 for h in cs.hosts)

    @invariant()
    def a_finished_stream_answered_or_was_reset(self) -> None:
        s = self.s
        if s.phase is DONE:
            assert RESET in self.history or (s.status > 0 and self.conn.codec.heads)


def test_stream_state_machine() -> None:
    run_state_machine_as_test(
        StreamMachine,
        settings=settings(
            max_examples=300,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_illegal_transitions_raise() -> None:
    for current in Phase:
        for new in Phase:
            if new in TRANSITIONS[current]:
                assert check(current, new) is new
                assert new > current  # phases only move forward
            else:
                with pytest.raises(IllegalTransition):
                    check(current, new)


def _stream(per_try: float | None = None) -> tuple[DownstreamStream, Conn, Pool, Timers]:
    timers = Timers()
    pool = Pool()
    rt = Runtime(snapshot(None, per_try), pool, timers)
    conn = Conn(Ctx(rt))
    s = DownstreamStream(conn, 1, request(False))  # type: ignore[arg-type]
    s.start()
    s.decode_end()
    return s, conn, pool, timers


def test_late_callbacks_of_an_old_attempt_do_not_touch_the_stream() -> None:
    s, conn, pool, timers = _stream(per_try=1.0)
    first = pool.pending.pop(0)
    first.attach(UpConn(False))  # type: ignore[arg-type]
    first.on_response_headers(first.sid, ResponseHead(503, raw=b"\r\n"))  # retried on 5xx
    assert s.upstream is None and first.stream is None
    [backoff] = timers.live()
    backoff.run()
    second = pool.pending.pop(0)
    assert second is not first and second.attempt == 2
    second.attach(UpConn(False))  # type: ignore[arg-type]
    # the old attempt's connection keeps talking: nothing reaches the stream
    first.on_response_headers(first.sid, ResponseHead(200, raw=b"\r\n"))
    first.on_response_data(first.sid, b"stale")
    first.on_response_end(first.sid)
    first.on_upstream_lost("connection termination", True)
    first.on_try_timeout()
    assert s.upstream is second and conn.codec.heads == [] and s.phase.name == "FORWARDING"
    second.on_response_headers(second.sid, ResponseHead(200, raw=b"\r\n"))
    second.on_response_data(second.sid, b"fresh")
    second.on_response_end(second.sid)
    assert conn.codec.heads == [200] and s.phase is DONE and s.resp_bytes == 5
    assert s.attempt == 2 and len(pool.attempts) == 2


def test_a_per_try_timeout_makes_a_new_attempt_and_the_old_timer_is_inert() -> None:
    s, _, pool, timers = _stream(per_try=1.0)
    first = pool.pending.pop(0)
    first.attach(UpConn(False))  # type: ignore[arg-type]
    [try_timer] = timers.live()
    try_timer.run()  # per-try timeout -> retry ("reset"/"5xx" policy retries timeouts too)
    assert first.stream is None and s.upstream is None
    first.on_try_timeout()  # a second firing (queued before cancel) is dropped
    [backoff] = timers.live()
    backoff.run()
    assert len(pool.attempts) == 2 and pool.attempts[1].attempt == 2


class Pausing(HttpFilter):
    """A decoder filter that stops the chain and resumes it later (like a fault delay or a
    JWKS fetch), or answers itself."""

    def __init__(self, answer: bool = False) -> None:
        self.answer = answer
        self.stopped: list[Any] = []
        self.seen_route: list[Any] = []

    def decode_headers(self, cb: Any, head: RequestHead) -> FilterStatus:
        if self.answer:
            cb.send_local_reply(403, b"RBAC: access denied", "RBAC")
            return STOP
        self.seen_route.append(cb.route_entry())
        self.stopped.append(cb)
        return STOP


class Counting(HttpFilter):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def decode_headers(self, cb: Any, head: RequestHead) -> FilterStatus:
        self.calls.append("decode")
        head.headers["x-counted"] = "1"
        return CONTINUE

    def encode_headers(self, cb: Any, head: ResponseHead) -> FilterStatus:
        self.calls.append(f"encode {head.status}")
        return CONTINUE

    def on_complete(self, cb: Any, flags: str, duration_ms: float) -> None:
        self.calls.append(f"complete {cb.status} {flags}")


def _chained(decode: list[HttpFilter], route: list[HttpFilter]) -> tuple[Any, ...]:
    timers = Timers()
    pool = Pool()
    rt = Runtime(snapshot(None, None), pool, timers)
    rt.filter_chains["outbound"] = FilterChain(decode, route, [StatsFilter(rt, "source")])
    conn = Conn(Ctx(rt))
    s = DownstreamStream(conn, 1, request(False))  # type: ignore[arg-type]
    s.start()
    s.decode_end()
    return s, conn, pool, rt


def test_a_filter_stops_the_chain_and_resumes_it() -> None:
    pausing, counting = Pausing(), Counting()
    s, _, pool, rt = _chained([pausing], [counting])
    assert s.phase.name == "DECODING" and not pool.attempts and counting.calls == []
    assert pausing.seen_route[0].route.name == "r"  # the route is matched on demand
    pausing.stopped[0].continue_decoding()
    assert counting.calls == ["decode"] and len(pool.attempts) == 1
    a = pool.pending.pop(0)
    a.attach(UpConn(False))  # type: ignore[arg-type]
    assert b"x-counted: 1\r\n" in a.conn.written  # route filters run before the request goes
    a.on_response_headers(a.sid, ResponseHead(200, raw=b"\r\n"))
    a.on_response_end(a.sid)
    assert counting.calls == ["decode", "encode 200", "complete 200 -"]
    assert len(rt.records) == 1


def test_a_stopped_stream_whose_client_left_is_not_resumed() -> None:
    pausing = Pausing()
    s, conn, pool, rt = _chained([pausing], [])
    s.downstream_lost()
    assert s.phase is DONE and not pausing.stopped[0].active()
    pausing.stopped[0].continue_decoding()  # the timer / fetch completes later: nothing
    assert not pool.attempts and conn.codec.heads == []
    assert rt.records[0][2] == "DC"


def test_a_filter_answers_locally() -> None:
    counting = Counting()
    s, conn, pool, rt = _chained([Pausing(answer=True), counting], [])
    assert conn.codec.heads == [403] and s.phase is DONE and not pool.attempts
    assert counting.calls == ["complete 403 RBAC"]  # its decode hook never ran
    assert rt.records[0][1:3] == (403, "RBAC")

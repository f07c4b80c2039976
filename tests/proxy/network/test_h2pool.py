"""The HTTP/2 upstream pool against a real h2c server on 127.0.0.1: multiplexing, the
per-connection stream limit, breaker limits, GOAWAY, failures."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from diktyo.proxy.codec.events import HeaderList, RequestHead, ResponseHead
from diktyo.proxy.codec.http2 import Http2Options
from diktyo.proxy.network.h2pool import H2ClusterPool, H2StreamHandle
from diktyo.proxy.stats import Stats
from diktyo.proxy.upstream.circuit_breaker import CircuitBreaker
from diktyo.snapshot.model import Cluster, ConnectionPool
from diktyo.testing.h2upstream import FakeH2Upstream
from diktyo.testing.wait import eventually


class Req:
    """A stand-in for the router's upstream attempt (``UpstreamCallbacks``): opens its stream
    on attach as ``UpstreamRequest`` does, records the answer."""

    def __init__(self, path: str = "/", body: bytes = b"") -> None:
        self.path = path
        self.body = body
        self.conn: H2StreamHandle | None = None
        self.sid = 0
        self.status = 0
        self.data = bytearray()
        self.trailers: HeaderList | None = None
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def attach(self, conn: H2StreamHandle) -> None:
        self.conn = conn
        head = RequestHead({"host": "up.test"})
        head.method = "POST" if self.body else "GET"
        head.path = self.path
        codec = conn.codec
        self.sid = sid = codec.new_stream()
        codec.send_headers(sid, head, end_stream=not self.body)
        if self.body:
            codec.send_data(sid, self.body, end_stream=True)
        conn.write()

    def _done(self, what: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(what)

    def on_response_headers(self, sid: int, head: ResponseHead) -> None:
        assert sid == self.sid
        self.status = head.status

    def on_response_data(self, sid: int, data: bytes) -> None:
        self.data += data

    def on_response_trailers(self, sid: int, trailers: HeaderList) -> None:
        self.trailers = trailers

    def on_response_end(self, sid: int) -> None:
        assert self.conn is not None
        self.conn.conn.pool.release(self.conn)
        self._done("ok")

    def on_upstream_lost(self, reason: str, started: bool) -> None:
        self._done(f"lost:{reason}")

    def on_upstream_protocol_error(self, detail: str) -> None:
        self._done(f"protocol_error:{detail}")

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass

    def flush_downstream(self) -> None:
        pass

    def overflow(self, message: str) -> None:
        self._done(f"overflow:{message}")

    def connect_failed(self, error: str) -> None:
        self._done(f"connect_failed:{error}")


def make_pool(port: int, **limits: Any) -> tuple[H2ClusterPool, Any, set[asyncio.Task[Any]]]:
    cp = ConnectionPool(**limits)
    cluster = Cluster(name="outbound|8080||up.test", pool=cp)
    state = SimpleNamespace(cluster=cluster, breaker=CircuitBreaker(cp, "DestinationRule up-cb"))
    tasks: set[asyncio.Task[Any]] = set()
    pool = H2ClusterPool(cluster.name, state, asyncio.get_running_loop(), Stats(), tasks)
    host = SimpleNamespace(key=("127.0.0.1", port), address="127.0.0.1", port=port, endpoint=None)
    return pool, host, tasks


async def test_concurrent_requests_share_one_connection() -> None:
    async with FakeH2Upstream() as up:
        pool, host, _ = make_pool(up.port)
        reqs = [Req(f"/r{i}", body=b"b%d" % i) for i in range(10)]
        for r in reqs:
            pool.acquire(r, host)
        outcomes = await asyncio.wait_for(asyncio.gather(*(r.outcome for r in reqs)), 10)
        assert outcomes == ["ok"] * 10
        assert [bytes(r.data) for r in reqs] == [b"POST /r%d b%d" % (i, i) for i in range(10)]
        assert len(up.conns) == 1
        assert sorted(rq.sid for rq in up.requests) == list(range(1, 21, 2))
        assert pool.state.breaker.connections == 1
        pool.close_all()


async def test_trailers_pass_through() -> None:
    async with FakeH2Upstream() as up:
        pool, host, _ = make_pool(up.port)
        r = Req("/trailers")
        pool.acquire(r, host)
        assert await asyncio.wait_for(r.outcome, 10) == "ok"
        assert r.trailers == [(b"grpc-status", b"0"), (b"grpc-message", b"fine")]
        pool.close_all()


async def test_stream_limit_of_the_peer_opens_more_connections() -> None:
    async with FakeH2Upstream(Http2Options(max_concurrent_streams=2)) as up:
        pool, host, _ = make_pool(up.port)
        reqs = [Req("/hold") for _ in range(5)]
        for r in reqs:
            pool.acquire(r, host)
        await eventually(lambda: len(up.requests) == 5, timeout=10)
        per_conn: dict[int, int] = {}
        for rq in up.requests:
            per_conn[rq.conn_id] = per_conn.get(rq.conn_id, 0) + 1
        assert sorted(per_conn.values()) == [1, 2, 2]  # never more than 2 streams on one
        assert all(rq.reset is None for rq in up.requests)  # none refused: limit respected
        up.release_held()
        assert await asyncio.wait_for(asyncio.gather(*(r.outcome for r in reqs)), 10) == ["ok"] * 5
        pool.close_all()


async def test_stream_limit_with_one_connection_queues_then_overflows() -> None:
    async with FakeH2Upstream(Http2Options(max_concurrent_streams=1)) as up:
        pool, host, _ = make_pool(up.port, max_connections=1, http1_max_pending_requests=1)
        first, second, third = Req("/hold"), Req("/"), Req("/")
        pool.acquire(first, host)
        await eventually(lambda: len(up.requests) == 1, timeout=10)
        pool.acquire(second, host)  # no slot: pending
        pool.acquire(third, host)  # pending queue full: overflow
        msg = await asyncio.wait_for(third.outcome, 5)
        assert msg.startswith("overflow:circuit breaker open")
        assert "connectionPool.http.http1MaxPendingRequests=1" in msg
        assert "DestinationRule up-cb" in msg
        assert not second.outcome.done()
        up.release_held()
        assert await asyncio.wait_for(first.outcome, 5) == "ok"
        assert await asyncio.wait_for(second.outcome, 5) == "ok"
        assert len(up.conns) == 1
        pool.close_all()


async def test_max_requests_per_connection_rotates_connections() -> None:
    async with FakeH2Upstream() as up:
        pool, host, _ = make_pool(up.port, max_requests_per_connection=2)
        for i in range(3):
            r = Req(f"/n{i}")
            pool.acquire(r, host)
            assert await asyncio.wait_for(r.outcome, 5) == "ok"
        assert [rq.conn_id for rq in up.requests] == [1, 1, 2]
        await eventually(lambda: len(up.open_conns) == 1, timeout=5)  # the used-up one closed
        pool.close_all()


async def test_goaway_moves_new_requests_to_a_new_connection() -> None:
    async with FakeH2Upstream() as up:
        pool, host, _ = make_pool(up.port)
        r = Req("/goaway")
        pool.acquire(r, host)
        assert await asyncio.wait_for(r.outcome, 5) == "ok"
        await eventually(lambda: not pool.conns or not next(iter(pool.conns.values()))[0].usable())
        r2 = Req("/after")
        pool.acquire(r2, host)
        assert await asyncio.wait_for(r2.outcome, 5) == "ok"
        assert [rq.conn_id for rq in up.requests] == [1, 2]
        pool.close_all()


async def test_upstream_dropping_the_connection_resets_its_streams() -> None:
    async with FakeH2Upstream() as up:
        pool, host, _ = make_pool(up.port)
        reqs = [Req("/hold"), Req("/hold")]
        for r in reqs:
            pool.acquire(r, host)
        await eventually(lambda: len(up.requests) == 2, timeout=10)
        for c in list(up.open_conns):
            assert c.transport is not None
            c.transport.abort()
        outcomes = await asyncio.wait_for(asyncio.gather(*(r.outcome for r in reqs)), 5)
        assert outcomes == ["lost:connection termination"] * 2
        await eventually(lambda: pool.state.breaker.connections == 0, timeout=5)


async def test_connect_failure_and_non_http2_upstream() -> None:
    # nothing listening
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    pool, host, _ = make_pool(port)
    r = Req("/")
    pool.acquire(r, host)
    assert (await asyncio.wait_for(r.outcome, 5)).startswith("connect_failed:")

    # an HTTP/1.1 server: answers the preface with an error and closes
    async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(http1, "127.0.0.1", 0)
    async with srv:
        pool, host, _ = make_pool(srv.sockets[0].getsockname()[1])
        r = Req("/")
        pool.acquire(r, host)
        outcome = await asyncio.wait_for(r.outcome, 5)
        assert outcome.startswith("connect_failed:upstream did not speak HTTP/2")
        assert "h2UpgradePolicy" in outcome


@pytest.mark.parametrize("size", [300_000])
async def test_large_response_flows_through_the_window(size: int) -> None:
    async with FakeH2Upstream() as up:
        pool, host, _ = make_pool(up.port)
        r = Req(f"/big/{size}")
        pool.acquire(r, host)
        assert await asyncio.wait_for(r.outcome, 10) == "ok"
        assert len(r.data) == size
        pool.close_all()


async def test_destination_rule_max_concurrent_streams_caps_each_connection() -> None:
    async with FakeH2Upstream() as up:  # the peer would allow 100
        pool, host, _ = make_pool(up.port, max_concurrent_streams=2)
        reqs = [Req("/hold") for _ in range(4)]
        for r in reqs:
            pool.acquire(r, host)
        await eventually(lambda: len(up.requests) == 4, timeout=10)
        assert sorted({rq.conn_id for rq in up.requests}) == [1, 2]
        assert max(sum(1 for rq in up.requests if rq.conn_id == c) for c in (1, 2)) == 2
        up.release_held()
        assert await asyncio.wait_for(asyncio.gather(*(r.outcome for r in reqs)), 10) == ["ok"] * 4
        pool.close_all()


class _StallingH2Server(asyncio.Protocol):
    """A minimal real HTTP/2 server (frames by hand): huge flow-control windows, answers the
    first request's HEADERS at once with ``200`` END_STREAM and then stops reading its socket
    until ``resume()``; records the frame types and the DATA bytes it reads, and how the
    connection ended."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.preface = False
        self.frames: list[int] = []
        self.data_bytes = 0
        self.answered = asyncio.Event()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @staticmethod
    def frame(t: int, flags: int, sid: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([t, flags]) + sid.to_bytes(4, "big") + payload

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # TCP gives a Transport
        big = 2**31 - 1
        settings = (4).to_bytes(2, "big") + big.to_bytes(4, "big")  # INITIAL_WINDOW_SIZE
        update = (big - 65535).to_bytes(4, "big")  # the connection window
        transport.write(self.frame(4, 0, 0, settings) + self.frame(8, 0, 0, update))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.preface:
            if len(self.buf) < len(self.PREFACE):
                return
            assert self.buf.startswith(self.PREFACE)
            self.buf = self.buf[len(self.PREFACE) :]
            self.preface = True
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + n:
                return
            t, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            self.buf = self.buf[9 + n :]
            self.frames.append(t)
            assert self.transport is not None
            if t == 0:  # DATA
                self.data_bytes += n
            elif t == 4 and not flags & 1:  # SETTINGS: acknowledge
                self.transport.write(self.frame(4, 1, 0, b""))
            elif t == 1 and not self.answered.is_set():  # HEADERS: 200 (indexed :status 200)
                self.transport.write(self.frame(1, 0x5, sid, b"\x88"))  # END_STREAM|END_HEADERS
                self.transport.pause_reading()
                self.answered.set()

    def resume(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if not self.ended.done():
            self.ended.set_result("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result("reset" if exc is not None else "closed")


async def test_a_retired_connection_closes_gracefully_after_writing_all_it_holds() -> None:
    """A connection retired by its pool writes out what its transport still holds (here a
    request body the upstream has not read yet, its stream already answered) and a
    GOAWAY(NO_ERROR), then closes with a FIN: the upstream reads every byte, the GOAWAY and an
    orderly end. It used to be aborted: the buffered bytes and the GOAWAY were lost and the
    upstream saw the connection cut mid-frame (stop 21, tidy; Envoy resets only on error)."""
    loop = asyncio.get_running_loop()
    servers: list[_StallingH2Server] = []

    def factory() -> _StallingH2Server:
        servers.append(_StallingH2Server())
        return servers[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        pool, host, _ = make_pool(server.sockets[0].getsockname()[1])
        pool.close_timeout = 30.0  # a loaded test machine: time enough to flush 24 MiB
        body = b"x" * (24 << 20)  # more than the kernel's socket buffers on both sides hold
        r = Req("/upload", body=body)
        pool.acquire(r, host)
        assert await asyncio.wait_for(r.outcome, 10) == "ok"
        (up,) = servers
        assert r.status == 200 and up.answered.is_set()
        (conn,) = pool.conns[host.key]
        assert conn.transport is not None and conn.transport.get_write_buffer_size() > 0
        pool.retire()  # no stream left: GOAWAY and close now
        assert conn.closed and host.key not in pool.conns
        up.resume()
        how = await asyncio.wait_for(up.ended, 30)
        assert up.data_bytes == len(body)  # every byte the transport held went out
        assert up.frames[-1] == 7  # ... then our GOAWAY
        assert how == "eof"  # ... then an orderly close, no reset
    finally:
        server.close()

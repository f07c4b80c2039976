"""Sidecar forwarding behaviour over real sockets: framing, headers, keep-alive, local replies."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from diktyo import _build
from diktyo.testing import (
    FakeUpstream,
    HttpClient,
    Response,
    eventually,
    free_port,
    http_request,
    http_snapshot,
    outbound_cluster,
    start_sidecar,
)

CL = outbound_cluster("reviews")


async def test_forwards_with_headers_and_keepalive_pooling() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        async with HttpClient(sc.port()) as c:
            for i in range(5):
                r = await c.get(
                    f"http://reviews/x/{i}",
                    {"Connection": "keep-alive", "X-Custom": "v", "TE": "trailers"},
                )
                assert r.status == 200 and r.body == b"ok"
        assert [q.path for q in up.requests] == [f"/x/{i}" for i in range(5)]
        q = up.requests[0]
        assert q.headers["host"] == "reviews"
        assert q.headers["x-forwarded-for"] == "127.0.0.1"
        assert q.headers["x-forwarded-proto"] == "http"
        assert q.headers["x-envoy-attempt-count"] == "1"
        assert len(q.headers["x-request-id"]) == 36
        assert q.headers["x-custom"] == "v"
        assert "te" not in q.headers and "connection" not in q.headers
        assert up.connections == 1  # one pooled upstream connection reused


async def test_existing_request_id_and_xff_are_kept_and_appended() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        r = await http_request(
            sc.port(),
            "GET",
            "http://reviews/",
            {"X-Request-Id": "abc", "X-Forwarded-For": "10.0.0.1"},
        )
        assert r.status == 200
        assert up.requests[0].headers["x-request-id"] == "abc"
        assert up.requests[0].headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


async def test_no_route_is_404_nr_and_never_reaches_upstream() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        r = await http_request(sc.port(), "GET", "http://ratings/")
        assert r.status == 404
        assert up.requests == []
        assert sc.sidecar.stats.request_count(response_flags="NR", response_code="404") == 1


async def test_malformed_requests_never_reach_upstream() -> None:
    bad = [
        b"GET / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: reviews\r\n" + b"X-A: b\r\n" * 150 + b"\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: reviews\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
    ]
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        for raw in bad:
            c = HttpClient(sc.port())
            await c.connect()
            await c.send_raw(raw)
            r = await c.read_response()
            assert r.status in (400, 431), raw
            await c.close()
        assert up.requests == []
        assert up.connections == 0


async def test_dead_upstream_is_503_uf_quickly() -> None:
    port = free_port()
    async with start_sidecar(http_snapshot({"reviews": [("127.0.0.1", port)]})) as sc:
        t0 = time.monotonic()
        r = await http_request(sc.port(), "GET", "http://reviews/")
        assert r.status == 503
        assert r.text == (
            "upstream connect error or disconnect/reset before headers. "
            "reset reason: connection failure"
        )
        assert time.monotonic() - t0 < 2.0
        # Istio's default retry policy retried the connect failure twice (Envoy: "UF,URX")
        assert sc.sidecar.stats.request_count(response_flags="UF,URX") == 1


async def test_no_endpoints_is_503_uh() -> None:
    async with start_sidecar(http_snapshot({"reviews": []})) as sc:
        r = await http_request(sc.port(), "GET", "http://reviews/")
        assert (r.status, r.text) == (503, "no healthy upstream")
        assert sc.sidecar.stats.request_count(response_flags="UH") == 1


async def test_head_204_and_chunked_responses() -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        if req.path == "/204":
            return Response(status=204, body=b"")
        if req.path == "/chunked":
            return Response(chunked=True, chunks=[b"a" * 10, b"b" * 5])
        return Response(body=b"0123456789")

    async with (
        FakeUpstream(handler=handler) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
        HttpClient(sc.port()) as c,
    ):
        r = await c.request("HEAD", "http://reviews/h")
        assert r.status == 200 and r.body == b"" and r.header("content-length") == "10"
        r = await c.get("http://reviews/204")
        assert r.status == 204 and r.body == b""
        r = await c.get("http://reviews/chunked")
        assert r.body == b"a" * 10 + b"b" * 5
        assert r.header("transfer-encoding") == "chunked"
        r = await c.get("http://reviews/after")  # connection still usable
        assert r.body == b"0123456789"


async def test_pipelined_requests_answered_in_order() -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        # the first one is slow: answers must still come back in order
        return Response(body=req.path.encode(), delay=0.1 if req.path == "/1" else 0)

    async with (
        FakeUpstream(handler=handler) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        async with HttpClient(sc.port()) as c:
            await c.send_raw(
                b"".join(b"GET /%d HTTP/1.1\r\nHost: reviews\r\n\r\n" % i for i in range(1, 4))
            )
            bodies = [(await c.read_response()).body for _ in range(3)]
        assert bodies == [b"/1", b"/2", b"/3"]


async def test_expect_100_continue_answered_by_proxy() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", sc.port())
        w.write(
            b"POST /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        line = await asyncio.wait_for(r.readline(), 3)
        assert line == b"HTTP/1.1 100 Continue\r\n"
        assert await r.readline() == b"\r\n"
        w.write(b"hello")
        data = await asyncio.wait_for(r.read(1000), 3)
        assert data.startswith(b"HTTP/1.1 200")
        w.close()
        assert up.requests[0].body == b"hello"
        assert "expect" not in up.requests[0].headers


async def test_streams_large_chunked_body_without_buffering() -> None:
    async with (
        FakeUpstream(keep_bodies=False) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", sc.port())
        w.write(b"POST /big HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await w.drain()
        # the upstream sees the first chunk while the client has not finished the body
        await asyncio.wait_for(up.first_body.wait(), 3)
        total = 65536
        for _ in range(20 * 16 - 1):  # 20 MiB in 64 KiB chunks
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
            total += len(piece)
        w.write(b"0\r\n\r\n")
        data = await asyncio.wait_for(r.read(1000), 10)
        assert data.startswith(b"HTTP/1.1 200")
        w.close()
        assert up.body_bytes == total == 20 * 1024 * 1024


async def test_keepalive_race_retried_on_fresh_connection() -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        # the upstream drops its idle connection exactly when the proxy reuses it
        if req.conn_seq == 2:
            return Response(close_without_response=True)
        return Response(body=b"fresh" if req.conn_seq == 1 else b"?")

    async with (
        FakeUpstream(handler=handler) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        async with HttpClient(sc.port()) as c:
            assert (await c.get("http://reviews/1")).status == 200
            r = await c.get("http://reviews/2")
            assert (r.status, r.body) == (200, b"fresh")
        assert up.connections == 2
        assert sc.sidecar.stats.request_count(response_code="503") == 0


async def test_upstream_close_after_headers_resets_downstream_uc() -> None:
    resp = Response(headers={"content-length": "100"}, body=b"short", close_after=True)
    async with (
        FakeUpstream(resp) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        c = HttpClient(sc.port())
        await c.connect()
        try:
            await c.get("http://reviews/")
            raise AssertionError("expected a reset")
        except ConnectionError:
            pass
        finally:
            await c.close()
        await eventually(lambda: sc.sidecar.stats.request_count(response_flags="UC") == 1)


async def test_downstream_disconnect_is_dc() -> None:
    async with (
        FakeUpstream(Response(delay=0.3)) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        _r, w = await asyncio.open_connection("127.0.0.1", sc.port())
        w.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
        await w.drain()
        await eventually(lambda: up.open_conns, what="the request reached the upstream")
        w.close()
        await eventually(lambda: sc.sidecar.stats.request_count(response_flags="DC") == 1)


async def test_inbound_listener_forwards_to_app_and_reports_destination() -> None:
    async with FakeUpstream() as app:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", 1)]},
            extra_clusters=[
                {
                    "name": "inbound|9080||",
                    "direction": "inbound",
                    "endpoints": [{"address": "127.0.0.1", "port": app.port}],
                }
            ],
            listeners=[
                {
                    "name": "inbound",
                    "direction": "inbound",
                    "port": 0,
                    "cluster": "inbound|9080||",
                    "service_port": 9080,
                }
            ],
        )
        async with start_sidecar(snap) as sc:
            r = await http_request(sc.port("inbound"), "GET", "/hello", {"Host": "reviews:9080"})
            assert r.status == 200
            assert app.requests[0].path == "/hello"
            assert sc.sidecar.stats.request_count(reporter="destination") == 1
            assert sc.sidecar.stats.request_count(reporter="source") == 0


async def test_tcp_listener_passes_bytes_both_ways() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1000):
            writer.write(data.upper())
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    snap = http_snapshot(
        {"reviews": [("127.0.0.1", 1)]},
        extra_clusters=[
            {
                "name": "outbound|5432||db",
                "protocol": "tcp",
                "endpoints": [{"address": "127.0.0.1", "port": port}],
            }
        ],
        listeners=[{"name": "db", "direction": "tcp", "port": 0, "cluster": "outbound|5432||db"}],
    )
    async with start_sidecar(snap) as sc:
        r, w = await asyncio.open_connection("127.0.0.1", sc.port("db"))
        w.write(b"hello tcp")
        assert await asyncio.wait_for(r.readexactly(9), 3) == b"HELLO TCP"
        w.close()
    server.close()


async def test_large_response_to_slow_client_is_flow_controlled() -> None:
    size = 16 * 1024 * 1024
    async with (
        FakeUpstream(Response(body=b"y" * size)) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", sc.port(), limit=2**16)
        # a tiny receive window: the client does not read for a while
        w.write(b"GET /big HTTP/1.1\r\nHost: reviews\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.5)  # real time: the client does not read for a while
        (ctx,) = [c for c in sc.sidecar.listeners.values() if c.name == "outbound"]
        (conn,) = list(ctx.connections)
        buffered = conn.transport.get_write_buffer_size()
        assert buffered < 4 * 1024 * 1024, buffered  # upstream reads were paused
        head = await r.readuntil(b"\r\n\r\n")
        assert b"content-length: %d" % size in head.lower()
        got = 0
        while got < size:
            chunk = await asyncio.wait_for(r.read(1 << 20), 10)
            assert chunk
            got += len(chunk)
        assert got == size
        w.close()


async def test_upload_to_slow_upstream_is_flow_controlled() -> None:
    readers: list[asyncio.StreamWriter] = []

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        readers.append(writer)  # accepts, never reads

    server = await asyncio.start_server(stalled, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with start_sidecar(http_snapshot({"reviews": [("127.0.0.1", port)]})) as sc:
        _r, w = await asyncio.open_connection("127.0.0.1", sc.port())
        sent = 0

        async def upload() -> None:
            nonlocal sent
            w.write(
                b"POST /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: %d\r\n\r\n"
                % (64 * 1024 * 1024)
            )
            piece = b"z" * 65536
            for _ in range(1024):
                w.write(piece)
                await w.drain()
                sent += len(piece)

        task = asyncio.create_task(upload())
        await asyncio.sleep(0.8)  # real time: the upload pushes against the slow reader for a while
        pool = sc.sidecar.pools["outbound|80||reviews"]
        (uconn,) = list(pool.active)
        assert uconn.transport.get_write_buffer_size() < 4 * 1024 * 1024
        assert sent < 32 * 1024 * 1024  # the client was pushed back
        task.cancel()
        w.close()
    server.close()
    for wr in readers:
        wr.close()


async def test_local_reply_to_head_has_no_body() -> None:
    async with start_sidecar(http_snapshot({"reviews": []})) as sc, HttpClient(sc.port()) as c:
        r = await c.request("HEAD", "http://reviews/")
        assert r.status == 503 and r.body == b""
        assert r.header("content-length") == str(len("no healthy upstream"))
        r = await c.get("http://reviews/")  # the connection is still in sync
        assert r.text == "no healthy upstream"


async def test_connect_timeout_is_503_uf() -> None:
    # a listener that never accepts, with its accept queue full: SYNs are dropped, connect hangs
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)

    def queue_full() -> bool:  # the first handshake completed: it sits in the accept queue
        try:
            fillers[0].getpeername()
        except OSError:
            return False
        return True

    await eventually(queue_full, what="the listener's accept queue full")
    snap = http_snapshot(
        {"reviews": [("127.0.0.1", port)]},
        routes={
            "reviews": [{"name": "r", "clusters": [{"cluster": CL}], "retries": {"attempts": 0}}]
        },
        clusters={"reviews": {"pool": {"connect_timeout": 0.3}}},
    )
    try:
        async with start_sidecar(snap) as sc:
            t0 = time.monotonic()
            r = await http_request(sc.port(), "GET", "http://reviews/")
            elapsed = time.monotonic() - t0
            assert r.status == 503
            assert r.text.endswith("reset reason: connection timeout")
            assert 0.25 < elapsed < 3.0
            assert sc.sidecar.stats.request_count(response_flags="UF") == 1
    finally:
        for c in fillers:
            c.close()
        lsock.close()


async def test_close_delimited_upstream_response_is_rechunked() -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http10, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with (
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", port)]})) as sc,
        HttpClient(sc.port()) as c,
    ):
        r = await c.get("http://reviews/")
        assert (r.status, r.body) == (200, b"until the end")
        assert r.header("transfer-encoding") == "chunked"
        r = await c.get("http://reviews/")  # the downstream connection stays usable
        assert r.body == b"until the end"
    server.close()


async def test_http10_clients_close_or_keep_alive() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        sc.sidecar.accept_http_10 = True  # --accept-http-10 (default: 426, as Envoy)
        r, w = await asyncio.open_connection("127.0.0.1", sc.port())
        w.write(b"GET /a HTTP/1.0\r\nHost: reviews\r\nConnection: keep-alive\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: keep-alive" in head.lower()
        assert await r.readexactly(2) == b"ok"
        w.write(b"GET /b HTTP/1.0\r\nHost: reviews\r\n\r\n")  # no keep-alive: closed after
        data = await asyncio.wait_for(r.read(), 3)
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
        w.close()
        assert [q.path for q in up.requests] == ["/a", "/b"]


@pytest.mark.skipif(
    _build.status()["compiled"],
    reason="injects the bug by monkeypatching RouteMatcher, which compiled callers never see; "
    "`make test-pure` (DIKTYO_PURE=1) runs it on the sources",
)
async def test_internal_error_costs_one_request_not_the_sidecar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from diktyo.proxy.router.matcher import RouteMatcher

    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        real = RouteMatcher.find_virtual_host

        def broken(self, authority):  # type: ignore[no-untyped-def]
            if authority == "boom":
                raise RuntimeError("bug")
            return real(self, authority)

        monkeypatch.setattr(RouteMatcher, "find_virtual_host", broken)
        r = await http_request(sc.port(), "GET", "http://boom/x")
        assert (r.status, r.text) == (500, "internal proxy error")
        assert (await http_request(sc.port(), "GET", "http://reviews/fine")).status == 200
        assert sc.sidecar.stats.server["downstream_rq_internal_error"] == 1

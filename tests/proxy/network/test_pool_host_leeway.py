"""Envoy's pool rule at the connection limit: a host with no connection still gets one.

Envoy's connection pool opens a connection for a pending request past ``maxConnections`` when
it has no connection at all to that request's host ("to prevent pending streams being queued
to this upstream with no way to be processed"), and counts ``upstream_cx_overflow``. Here: a
cluster of two endpoints with ``maxConnections: 1``; the first request holds the only
connection (its upstream answers only once the second request has arrived at the other
endpoint), the second request goes to the other endpoint and must not wait for the first.
"""

from __future__ import annotations

import asyncio
import urllib.request

from diktyo.testing.sidecar import start_sidecar
from diktyo.testing.snapshots import http_snapshot


class HeldUpstream:
    """An HTTP/1.1 server that answers once ``release`` is set (or after ``hold`` seconds)."""

    def __init__(self, release: asyncio.Event, arrived: asyncio.Event, hold: float) -> None:
        self.release, self.arrived, self.hold = release, arrived, hold
        self.port = 0
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            self.arrived.set()
            try:
                await asyncio.wait_for(self.release.wait(), self.hold)
                body = b"overlapped"
            except TimeoutError:
                body = b"alone"
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def __aenter__(self) -> HeldUpstream:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def scrape(admin: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5) as r:
        return str(r.read().decode())


async def get(port: int) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data.partition(b"\r\n\r\n")[2]


async def test_a_host_without_connection_gets_one_past_the_connection_limit() -> None:
    one_arrived, two_arrived = asyncio.Event(), asyncio.Event()
    # each endpoint answers once a request has reached the other one (or after 3 s): the
    # first request holds the only connection until the second reaches the other endpoint
    async with (
        HeldUpstream(two_arrived, one_arrived, hold=3.0) as one,
        HeldUpstream(one_arrived, two_arrived, hold=3.0) as two,
    ):
        pool = {"max_connections": 1, "http1_max_pending_requests": 10}
        snap = http_snapshot(
            {"svc": [("127.0.0.1", one.port), ("127.0.0.1", two.port)]},
            clusters={"svc": {"pool": pool, "lb": {"simple": "ROUND_ROBIN"}}},
        )
        async with start_sidecar(snap) as h:
            first = asyncio.create_task(get(h.port()))
            arrivals = [asyncio.ensure_future(e.wait()) for e in (one_arrived, two_arrived)]
            await asyncio.wait(arrivals, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            for f in arrivals:
                f.cancel()
            assert one_arrived.is_set() or two_arrived.is_set()
            second = await get(h.port())  # round robin: the other endpoint
            # the second request did not wait for the first one's connection to be released
            assert (await first, second) == (b"overlapped", b"overlapped")
            counters = await asyncio.to_thread(scrape, h.admin)
            overflow = [
                ln
                for ln in counters.splitlines()
                if ln.startswith("envoy_cluster_upstream_cx_overflow{")
            ]
            assert overflow and float(overflow[0].rsplit(" ", 1)[1]) >= 1, overflow

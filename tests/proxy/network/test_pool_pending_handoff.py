"""The hand-off from a connection closed after its last request to the request pending for it.

Envoy's pool, on a connection's close event: "if we have pending streams and we just lost a
connection we should make a new one" (``ConnPoolImplBase::onConnectionEvent`` calls
``tryCreateNewConnections`` right there). With ``maxConnections: 1`` and
``maxRequestsPerConnection: 1`` (Istio's circuit-breaking task) the request waiting for the
only connection gets its own new connection as soon as the previous one is released - within
that same call, not a loop iteration later, so its connection is under way before the previous
response is written downstream. Real pool, real upstream sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from diktyo.core.clock import ManualClock
from diktyo.proxy.network.pool import Http1Pool
from diktyo.proxy.stats import Stats
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.testing import http_snapshot

CLUSTER = "outbound|80||reviews"


class Requester:
    """The pool's side of an upstream attempt: records what the pool did with it."""

    def __init__(self) -> None:
        self.conn: Any = None
        self.attached = asyncio.Event()
        self.outcome = ""

    def attach(self, conn: Any) -> None:
        self.conn = conn
        self.outcome = "attached"
        self.attached.set()

    def overflow(self, message: str) -> None:
        self.outcome = f"overflow: {message}"
        self.attached.set()

    def connect_failed(self, reason: str) -> None:
        self.outcome = f"connect failed: {reason}"
        self.attached.set()


async def test_a_pending_request_gets_its_connection_started_when_the_last_one_closes() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool_cfg = {
            "max_connections": 1,
            "http1_max_pending_requests": 1,
            "max_requests_per_connection": 1,
        }
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", port)]}, clusters={"reviews": {"pool": pool_cfg}}
        )
        state = ClusterState(snap.clusters[0], ManualClock(), random.Random(1))
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[Any]] = set()
        stats = Stats()
        pool = Http1Pool(CLUSTER, state, loop, stats, tasks)
        host = state.hosts[0]

        a, b = Requester(), Requester()
        pool.acquire(a, host)
        await asyncio.wait_for(a.attached.wait(), 5)
        assert a.outcome == "attached"
        pool.acquire(b, host)  # pending: the only connection is a's
        assert pool.connecting == 0 and len(pool.pending) == 1

        pool.release(a.conn)  # a's response is complete: its connection served its one request
        assert a.conn.closed
        # b's connection is already being opened: counted against maxConnections and connecting
        assert pool.connecting == 1, "the pending request's connection was not started at once"
        assert state.breaker.can_open_connection() is False
        await asyncio.wait_for(b.attached.wait(), 5)
        assert b.outcome == "attached" and b.conn is not a.conn
        assert len(pool.pending) == 0
        pool.release(b.conn)
        assert pool.connecting == 0 and not pool.active
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()

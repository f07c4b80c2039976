"""Random upstream failures, client disconnects, breaker limits and retries at once: every request
ends (no hang) and every counter returns to zero (no leaked breaker slot, pending entry or
active request)."""

from __future__ import annotations

import asyncio
import random

import pytest

from diktyo.testing import (
    FakeUpstream,
    HttpClient,
    RecordedRequest,
    Response,
    eventually,
    http_snapshot,
    outbound_cluster,
    start_sidecar,
)

CL = outbound_cluster("reviews")


def chaotic(seed: int):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)

    def handler(req: RecordedRequest) -> Response:
        x = rng.random()
        if x < 0.15:
            return Response(status=503, body=b"busy")
        if x < 0.25:
            return Response(close_without_response=True)
        if x < 0.35:
            return Response(body=b"bye", close_after=True)
        if x < 0.45:
            return Response(delay=0.05, chunked=True, chunks=[b"a", b"b"])
        # echo how much body arrived, so clients can check uploads survived retries intact
        return Response(body=b"%d" % len(req.body), delay=rng.choice([0, 0, 0.01]))

    return handler


@pytest.mark.parametrize("seed", [99, 7, 2026])
async def test_chaos_leaves_no_leaked_state(seed: int) -> None:
    rng = random.Random(seed)
    async with (
        FakeUpstream(handler=chaotic(seed + 1)) as a,
        FakeUpstream(handler=chaotic(seed + 2)) as b,
    ):
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", a.port), ("127.0.0.1", b.port)]},
            routes={
                "reviews": [
                    {
                        "name": "r",
                        "clusters": [{"cluster": CL}],
                        "timeout": 2.0,
                        "retries": {
                            "attempts": 2,
                            "retry_on": ["5xx", "reset"],
                            "per_try_timeout": 1.0,
                        },
                    }
                ]
            },
            clusters={
                "reviews": {
                    "pool": {
                        "max_connections": 3,
                        "http1_max_pending_requests": 4,
                        "max_requests_per_connection": 5,
                        "max_retries": 3,
                    },
                    "outlier": {"consecutive_5xx_errors": 0},
                }
            },
        )
        async with start_sidecar(snap, seed=5) as sc:
            statuses: list[int] = []

            async def client(n: int) -> None:
                for _ in range(n):
                    if rng.random() < 0.1:  # an impatient client leaves mid-request
                        _r, w = await asyncio.open_connection("127.0.0.1", sc.port())
                        w.write(b"GET /x HTTP/1.1\r\nHost: reviews\r\n\r\n")
                        await w.drain()
                        await asyncio.sleep(rng.choice([0, 0.005, 0.02]))  # real time: random client pacing
                        w.close()
                        continue
                    body = b"u" * rng.choice([0, 10, 70_000, 300_000])
                    try:
                        async with HttpClient(sc.port(), timeout=5) as c:
                            r = await c.request("POST", "http://reviews/x", body=body)
                            statuses.append(r.status)
                            if r.status == 200 and r.body not in (b"a" + b"b", b"bye"):
                                assert r.body == b"%d" % len(body)
                    except ConnectionError:
                        statuses.append(0)  # reset mid-response (UC) is allowed

            await asyncio.wait_for(asyncio.gather(*(client(25) for _ in range(6))), 60)
            assert len(statuses) > 50
            assert set(statuses) <= {0, 200, 503, 504}
            assert statuses.count(200) > len(statuses) // 3
            # let the dust settle, then every counter must be back to zero
            await eventually(
                lambda: not any(
                    c.streams for ctx in sc.sidecar.listeners.values() for c in ctx.connections
                ),
                timeout=15,
                what="every stream finished",
            )
            cs = sc.sidecar.rt.clusters[CL]
            pool = sc.sidecar.pools[CL]
            br = cs.breaker
            await eventually(  # a reset stream's upstream side is let go on the next callbacks
                lambda: (br.pending, br.requests, br.retries) == (0, 0, 0) and not pool.pending,
                timeout=5,
                what=lambda: f"breaker counters back to zero: {br.pending, br.requests, br.retries}",
            )
            assert (br.pending, br.requests, br.retries) == (0, 0, 0)
            assert br.connections == len(pool.active) + pool.connecting
            assert not pool.pending
            assert cs.active_requests == 0
            assert all(h.active_requests == 0 for h in cs.hosts)

"""Sidecar traffic policies over real sockets: circuit breaking, retries, timeouts, faults, mirrors,
redirects, direct responses, header operations and rewrites."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from diktyo.testing import (
    FakeUpstream,
    HttpClient,
    Response,
    eventually,
    http_request,
    http_snapshot,
    outbound_cluster,
    start_sidecar,
)

CL = outbound_cluster("reviews")


def one_route(**kw: Any) -> dict[str, list[dict[str, Any]]]:
    r: dict[str, Any] = {"name": "r", "clusters": [{"cluster": CL, "host": "reviews"}]}
    r.update(kw)
    return {"reviews": [r]}


async def run_clients(port: int, clients: int, n: int) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []

    async def client() -> None:
        async with HttpClient(port) as c:
            for _ in range(n):
                r = await c.get("http://reviews/get")
                out.append((r.status, r.text))

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


async def test_istio_circuit_breaking_task() -> None:
    pool = {"max_connections": 1, "http1_max_pending_requests": 1, "max_requests_per_connection": 1}
    async with FakeUpstream(Response(delay=0.01)) as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            clusters={"reviews": {"pool": pool, "policy_source": "reviews"}},
        )
        async with start_sidecar(snap) as sc:
            two = await run_clients(sc.port(), 2, 20)
            ok2 = sum(1 for s, _ in two if s == 200)
            uo2 = [t for s, t in two if s == 503]
            assert ok2 >= 20 and len(uo2) >= 1
            assert "circuit breaker" in uo2[0] and "reviews" in uo2[0]
            three = await run_clients(sc.port(), 3, 20)
            uo3 = sum(1 for s, _ in three if s == 503)
            assert uo3 / 60 > len(uo2) / 40
            stats = sc.sidecar.stats
            assert stats.request_count(response_flags="UO") == len(uo2) + uo3
            assert stats.cluster_value(CL, "upstream_rq_pending_overflow") == len(uo2) + uo3
            text = stats.render_prometheus()
            assert f'envoy_cluster_upstream_rq_pending_overflow{{cluster_name="{CL}"}}' in text
            # nothing leaked: every counter went back to zero
            cs = sc.sidecar.rt.clusters[CL]
            assert (cs.breaker.pending, cs.breaker.requests, cs.active_requests) == (0, 0, 0)
            assert all(h.active_requests == 0 for h in cs.hosts)


async def test_retry_5xx_on_another_host_with_attempt_count() -> None:
    async with (
        FakeUpstream(Response(status=503, body=b"bad")) as bad,
        FakeUpstream(Response(body=b"good")) as good,
    ):
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", bad.port), ("127.0.0.1", good.port)]},
            routes=one_route(retries={"attempts": 3, "retry_on": ["5xx"]}),
            clusters={"reviews": {"lb": {"simple": "ROUND_ROBIN"}}},
        )
        async with start_sidecar(snap) as sc:
            for _ in range(4):
                r = await http_request(sc.port(), "GET", "http://reviews/")
                assert (r.status, r.body) == (200, b"good")
            attempts = {q.headers["x-envoy-attempt-count"] for q in good.requests}
            assert "2" in attempts
            assert all(q.headers["x-envoy-attempt-count"] == "1" for q in bad.requests)


async def test_retries_exhausted_returns_last_response_with_urx() -> None:
    async with FakeUpstream(Response(status=503, body=b"down")) as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            routes=one_route(retries={"attempts": 2, "retry_on": ["5xx"]}),
        )
        async with start_sidecar(snap) as sc:
            r = await http_request(sc.port(), "GET", "http://reviews/")
            assert (r.status, r.body) == (503, b"down")
            assert len(up.requests) == 3
            assert [q.headers["x-envoy-attempt-count"] for q in up.requests] == ["1", "2", "3"]
            assert sc.sidecar.stats.request_count(response_flags="URX") == 1
            breaker = sc.sidecar.rt.clusters[CL].breaker
            assert (breaker.retries, breaker.requests) == (0, 0)  # every retry slot given back


async def test_per_try_timeout_retried_then_succeeds() -> None:
    def handler(req):  # type: ignore[no-untyped-def]
        return Response(
            delay=1.0 if req.headers["x-envoy-attempt-count"] == "1" else 0, body=b"second"
        )

    async with FakeUpstream(handler=handler) as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            routes=one_route(retries={"attempts": 2, "per_try_timeout": 0.1, "retry_on": ["5xx"]}),
        )
        async with start_sidecar(snap) as sc:
            t0 = time.monotonic()
            r = await http_request(sc.port(), "GET", "http://reviews/")
            assert (r.status, r.body) == (200, b"second")
            assert time.monotonic() - t0 < 0.9


async def test_route_timeout_is_504_ut() -> None:
    async with FakeUpstream(Response(delay=2.0)) as up:
        snap = http_snapshot({"reviews": [("127.0.0.1", up.port)]}, routes=one_route(timeout=0.2))
        async with start_sidecar(snap) as sc:
            t0 = time.monotonic()
            r = await http_request(sc.port(), "GET", "http://reviews/")
            assert (r.status, r.text) == (504, "upstream request timeout")
            assert time.monotonic() - t0 < 1.5
            assert sc.sidecar.stats.request_count(response_flags="UT") == 1
            # the header overrides the route timeout
            up.respond(Response(delay=0.3))
            r = await http_request(
                sc.port(), "GET", "http://reviews/", {"x-envoy-upstream-rq-timeout-ms": "2000"}
            )
            assert r.status == 200


async def test_fault_abort_fi_and_delay_di() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            routes={
                "reviews": [
                    {
                        "name": "abort",
                        "matches": [{"uri": {"kind": "prefix", "value": "/abort"}}],
                        "clusters": [{"cluster": CL}],
                        "fault": {"abort": {"http_status": 418}},
                    },
                    {
                        "name": "delay",
                        "matches": [{"uri": {"kind": "prefix", "value": "/delay"}}],
                        "clusters": [{"cluster": CL}],
                        "fault": {"delay": {"fixed_delay": 0.3}},
                    },
                    {
                        "name": "half",
                        "matches": [{"uri": {"kind": "prefix", "value": "/half"}}],
                        "clusters": [{"cluster": CL}],
                        "fault": {"abort": {"http_status": 500, "percentage": 50.0}},
                    },
                ]
            },
        )
        async with start_sidecar(snap, seed=42) as sc:
            r = await http_request(sc.port(), "GET", "http://reviews/abort")
            assert (r.status, r.text) == (418, "fault filter abort")
            assert up.requests == []
            t0 = time.monotonic()
            r = await http_request(sc.port(), "GET", "http://reviews/delay")
            assert r.status == 200 and time.monotonic() - t0 >= 0.29
            async with HttpClient(sc.port()) as c:
                codes = [(await c.get("http://reviews/half")).status for _ in range(100)]
            assert 25 < codes.count(500) < 75
            stats = sc.sidecar.stats
            assert stats.request_count(response_flags="FI", response_code="418") == 1
            assert stats.request_count(response_flags="DI") == 1


async def test_mirror_gets_a_shadow_copy_and_never_affects_response() -> None:
    async with (
        FakeUpstream(Response(body=b"main")) as main,
        FakeUpstream(Response(status=500, delay=0.5)) as shadow,
    ):
        mcl = outbound_cluster("mirror")
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", main.port)], "mirror": [("127.0.0.1", shadow.port)]},
            routes=one_route(mirrors=[{"cluster": mcl, "host": "mirror"}]),
        )
        async with start_sidecar(snap) as sc:
            t0 = time.monotonic()
            r = await http_request(sc.port(), "POST", "http://reviews:80/m", body=b"payload")
            assert (r.status, r.body) == (200, b"main")
            assert time.monotonic() - t0 < 0.4  # not waiting for the slow shadow
            await eventually(lambda: shadow.requests, timeout=10, what="the mirrored copy")
            (copy,) = shadow.requests
            assert copy.headers["host"] == "reviews-shadow:80"
            assert copy.body == b"payload"


async def test_redirect_direct_response_header_ops_and_rewrite() -> None:
    async with FakeUpstream(Response(headers={"x-remove-me": "1", "x-keep": "1"})) as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            routes={
                "reviews": [
                    {
                        "name": "redir",
                        "matches": [{"uri": {"kind": "exact", "value": "/old"}}],
                        "redirect": {"uri": "/new", "authority": "ratings"},
                    },
                    {
                        "name": "direct",
                        "matches": [{"uri": {"kind": "exact", "value": "/ping"}}],
                        "direct_response": {"status": 200, "body": "pong"},
                    },
                    {
                        "name": "rw",
                        "matches": [{"uri": {"kind": "prefix", "value": "/v1/"}}],
                        "rewrite": {"uri": "/api/", "authority": "backend"},
                        "headers": {
                            "request": {
                                "set": {"x-set": "s"},
                                "add": {"x-add": "a"},
                                "remove": ["x-drop"],
                            },
                            "response": {"set": {"x-resp": "r"}, "remove": ["x-remove-me"]},
                        },
                        "clusters": [
                            {"cluster": CL, "headers": {"request": {"set": {"x-dest": "d"}}}}
                        ],
                    },
                ]
            },
        )
        async with start_sidecar(snap) as sc:
            r = await http_request(sc.port(), "GET", "http://reviews/old?q=1")
            assert r.status == 301
            assert r.header("location") == "http://ratings/new?q=1"
            r = await http_request(sc.port(), "GET", "http://reviews/ping")
            assert (r.status, r.body) == (200, b"pong")
            assert up.requests == []
            r = await http_request(sc.port(), "GET", "http://reviews/v1/items?x=2", {"x-drop": "1"})
            assert r.status == 200
            assert r.header("x-resp") == "r" and r.header("x-keep") == "1"
            assert r.header("x-remove-me") is None
            (q,) = up.requests
            assert q.path == "/api/items?x=2"
            assert q.headers["host"] == "backend"
            assert q.headers["x-set"] == "s" and q.headers["x-add"] == "a"
            assert q.headers["x-dest"] == "d" and "x-drop" not in q.headers


async def test_weighted_destinations_split_traffic() -> None:
    async with FakeUpstream(Response(body=b"v1")) as v1, FakeUpstream(Response(body=b"v2")) as v2:
        c1, c2 = outbound_cluster("reviews", subset="v1"), outbound_cluster("reviews", subset="v2")
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", v1.port)]},
            routes={
                "reviews": [
                    {
                        "name": "split",
                        "clusters": [
                            {"cluster": c1, "subset": "v1", "weight": 80},
                            {"cluster": c2, "subset": "v2", "weight": 20},
                        ],
                    }
                ]
            },
            extra_clusters=[
                {
                    "name": c1,
                    "service": "reviews",
                    "subset": "v1",
                    "endpoints": [{"address": "127.0.0.1", "port": v1.port}],
                },
                {
                    "name": c2,
                    "service": "reviews",
                    "subset": "v2",
                    "endpoints": [{"address": "127.0.0.1", "port": v2.port}],
                },
            ],
        )
        async with start_sidecar(snap, seed=3) as sc, HttpClient(sc.port()) as c:
            bodies = [(await c.get("http://reviews/")).body for _ in range(200)]
        share = bodies.count(b"v2") / len(bodies)
        assert 0.1 < share < 0.3


async def test_consistent_hash_cookie_is_set_and_sticks() -> None:
    async with FakeUpstream(Response(body=b"a")) as a, FakeUpstream(Response(body=b"b")) as b:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", a.port), ("127.0.0.1", b.port)]},
            clusters={
                "reviews": {
                    "lb": {"consistent_hash": {"http_cookie": "user", "http_cookie_ttl": 60.0}}
                }
            },
        )
        async with start_sidecar(snap) as sc:
            r = await http_request(sc.port(), "GET", "http://reviews/")
            cookie = r.header("set-cookie")
            assert cookie is not None and cookie.startswith("user=")
            value = cookie.split(";")[0]
            bodies = set()
            for _ in range(10):
                r = await http_request(sc.port(), "GET", "http://reviews/", {"Cookie": value})
                bodies.add(r.body)
                assert r.header("set-cookie") is None
            assert len(bodies) == 1

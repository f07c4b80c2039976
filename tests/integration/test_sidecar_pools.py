"""Upstream pools and connection hygiene: idle timeouts, max requests per connection, outlier
ejection, downstream header timeout, access log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from diktyo.proxy import sidecar as sidecar_mod
from diktyo.testing import (
    FakeUpstream,
    HttpClient,
    Response,
    eventually,
    http_request,
    http_snapshot,
    start_sidecar,
)


async def test_max_requests_per_connection_opens_new_connections() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            clusters={"reviews": {"pool": {"max_requests_per_connection": 2}}},
        )
        async with start_sidecar(snap) as sc:
            async with HttpClient(sc.port()) as c:
                for _ in range(6):
                    assert (await c.get("http://reviews/")).status == 200
            assert up.connections == 3


async def test_idle_upstream_connections_expire() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            clusters={"reviews": {"pool": {"idle_timeout": 0.2}}},
        )
        async with start_sidecar(snap) as sc:
            assert (await http_request(sc.port(), "GET", "http://reviews/")).status == 200
            assert len(up.open_conns) == 1
            await eventually(lambda: not up.open_conns, timeout=10, what="the idle connection closed")


async def test_outlier_detection_ejects_failing_host() -> None:
    async with FakeUpstream(Response(status=500)) as bad, FakeUpstream() as good:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", bad.port), ("127.0.0.1", good.port)]},
            routes={
                "reviews": [
                    {
                        "name": "r",
                        "clusters": [{"cluster": "outbound|80||reviews"}],
                        "retries": {"attempts": 0},
                    }
                ]
            },
            clusters={
                "reviews": {
                    "lb": {"simple": "ROUND_ROBIN"},
                    "outlier": {
                        "consecutive_5xx_errors": 2,
                        "interval": 1.0,
                        "base_ejection_time": 30.0,
                        "max_ejection_percent": 100.0,
                    },
                }
            },
        )
        async with start_sidecar(snap) as sc:
            async with HttpClient(sc.port()) as c:
                codes = [(await c.get("http://reviews/")).status for _ in range(20)]
            assert codes.count(500) == 2  # ejected after two consecutive 5xx
            assert codes[-10:] == [200] * 10
            r = await http_request(sc.admin, "GET", "/clusters", {"Host": "admin"})
            assert r.status == 200 and str(bad.port) in r.text


async def test_header_timeout_answers_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sidecar_mod, "HEADER_TIMEOUT", 0.2)
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", sc.port())
        w.write(b"GET / HTTP/1.1\r\nHost: rev")  # never finishes the head
        data = await asyncio.wait_for(r.read(1000), 5)
        assert data.startswith(b"HTTP/1.1 408")
        assert await asyncio.wait_for(r.read(1000), 5) == b""  # closed
        w.close()
        assert up.requests == []


async def test_access_log_in_istio_text_format(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with FakeUpstream() as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            mesh={"access_log": {"enabled": True, "path": str(log)}},
        )
        async with start_sidecar(snap) as sc:
            await http_request(
                sc.port(),
                "GET",
                "http://reviews/logged",
                {"User-Agent": "pytest", "X-Request-Id": "rid-1"},
            )
            await http_request(sc.port(), "GET", "http://nowhere/x")
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert '"GET /logged HTTP/1.1" 200 - ' in lines[0]
    assert '"pytest" "rid-1" "reviews"' in lines[0]
    assert f'"127.0.0.1:{up.port}" outbound|80||reviews' in lines[0]
    assert '"GET /x HTTP/1.1" 404 NR ' in lines[1]


async def test_client_disconnects_do_not_eject_hosts() -> None:
    async with FakeUpstream(Response(delay=0.5)) as up:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            clusters={
                "reviews": {
                    "outlier": {
                        "consecutive_5xx_errors": 1,
                        "consecutive_gateway_errors": 1,
                        "max_ejection_percent": 100.0,
                    }
                }
            },
        )
        async with start_sidecar(snap) as sc:
            for _ in range(3):  # impatient clients leave before the slow answer
                _r, w = await asyncio.open_connection("127.0.0.1", sc.port())
                w.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                await w.drain()
                await asyncio.sleep(0.05)  # real time: the client leaves before the slow answer
                w.close()
            await eventually(lambda: sc.sidecar.stats.request_count(response_flags="DC") == 3)
            (host,) = sc.sidecar.rt.clusters["outbound|80||reviews"].hosts
            assert host.ejected_until == 0 and host.active_requests == 0

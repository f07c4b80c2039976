"""Sidecar lifecycle: atomic snapshot swaps under load, rejected snapshots, admin API, drain, CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from diktyo.snapshot.codec import SnapshotError
from diktyo.testing import (
    FakeUpstream,
    HttpClient,
    eventually,
    free_port,
    http_request,
    http_snapshot,
    start_sidecar,
    start_sidecar_process,
)


async def test_snapshot_swap_under_load_has_zero_failures() -> None:
    async with FakeUpstream(name="a") as a, FakeUpstream(name="b") as b:
        snaps = [
            http_snapshot({"reviews": [("127.0.0.1", up.port)]}, version=str(i))
            for i, up in enumerate([a, b] * 5)
        ]
        async with start_sidecar(snaps[0]) as sc:
            stop = asyncio.Event()
            results: list[int] = []

            async def client() -> None:
                async with HttpClient(sc.port()) as c:
                    while not stop.is_set():
                        results.append((await c.get("http://reviews/")).status)

            tasks = [asyncio.create_task(client()) for _ in range(4)]
            async def more_answers(n: int = 3) -> None:
                want = len(results) + n
                await eventually(lambda: len(results) >= want, what=f"{want} answers")

            for snap in snaps[1:]:
                await more_answers()  # snapshots spaced out while traffic flows
                sc.sidecar.apply(snap)
            await more_answers()  # traffic after the last snapshot
            stop.set()
            await asyncio.gather(*tasks)
            assert len(results) > 20
            assert set(results) == {200}
            assert a.requests and b.requests
            assert sc.sidecar.rt.snapshot.version == "9"


async def test_invalid_snapshot_rejected_and_old_one_keeps_serving() -> None:
    async with FakeUpstream() as up:
        good = http_snapshot({"reviews": [("127.0.0.1", up.port)]}, version="good")
        async with start_sidecar(good) as sc:
            bad = http_snapshot(
                {"reviews": [("127.0.0.1", up.port)]},
                version="bad",
                routes={
                    "reviews": [
                        {
                            "name": "x",
                            "matches": [{"uri": {"kind": "regex", "value": "(["}}],
                            "clusters": [{"cluster": "outbound|80||reviews"}],
                        }
                    ]
                },
            )
            with pytest.raises(SnapshotError, match="regex"):
                sc.sidecar.apply(bad)
            busy = msgspec.structs.replace(
                good,
                version="busy",
                listeners=(
                    *good.listeners,
                    msgspec.convert(
                        {
                            "name": "taken",
                            "direction": "outbound",
                            "port": sc.admin,
                            "route_table": "outbound",
                        },
                        type(good.listeners[0]),
                    ),
                ),
            )
            with pytest.raises(SnapshotError, match="cannot bind"):
                sc.sidecar.apply(busy)
            assert sc.sidecar.rt.snapshot.version == "good"
            r = await http_request(sc.port(), "GET", "http://reviews/")
            assert r.status == 200
            assert sc.sidecar.rejected == 2


async def test_new_listener_added_by_snapshot_swap() -> None:
    async with FakeUpstream() as up:
        first = http_snapshot({"reviews": [("127.0.0.1", up.port)]}, version="1")
        async with start_sidecar(first) as sc:
            second = http_snapshot(
                {"reviews": [("127.0.0.1", up.port)]},
                version="2",
                listeners=[
                    {
                        "name": "outbound-2",
                        "direction": "outbound",
                        "port": 0,
                        "route_table": "outbound",
                    }
                ],
            )
            old_port = sc.port("outbound")
            sc.sidecar.apply(second)
            await sc.sidecar.wait_listening()
            ports = sc.sidecar.ports()
            assert ports["outbound"] == old_port
            r = await http_request(ports["outbound-2"], "GET", "http://reviews/")
            assert r.status == 200


async def test_admin_endpoints() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot({"reviews": [("127.0.0.1", up.port)]}, version="v7")
        async with start_sidecar(snap) as sc:
            await http_request(sc.port(), "GET", "http://reviews/")
            r = await http_request(sc.admin, "GET", "/ready", {"Host": "admin"})
            assert r.status == 200
            r = await http_request(sc.admin, "GET", "/stats/prometheus", {"Host": "admin"})
            assert "istio_requests_total{" in r.text
            assert "istio_request_duration_milliseconds_bucket{" in r.text
            assert 'reporter="source"' in r.text
            r = await http_request(sc.admin, "GET", "/config_dump", {"Host": "admin"})
            assert json.loads(r.body)["version"] == "v7"
            r = await http_request(sc.admin, "GET", "/clusters", {"Host": "admin"})
            (c,) = json.loads(r.body)["clusters"]
            assert c["name"] == "outbound|80||reviews"
            assert c["pool"]["idle_connections"] == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_prometheus_output_passes_promtool() -> None:
    async with (
        FakeUpstream() as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        await http_request(sc.port(), "GET", "http://reviews/")
        await http_request(sc.port(), "GET", "http://nope/")
        text = sc.sidecar.stats.render_prometheus(sc.sidecar.rt.clusters)
    res = subprocess.run(  # noqa: ASYNC221
        ["promtool", "check", "metrics"],
        input=text.encode(),
        check=False,
        capture_output=True,
        timeout=30,
    )
    problems = [
        ln
        for ln in res.stdout.decode().splitlines() + res.stderr.decode().splitlines()
        if "error" in ln.lower()
    ]
    assert not problems, problems


async def test_drain_finishes_in_flight_requests() -> None:
    from diktyo.testing import Response

    async with (
        FakeUpstream(Response(delay=0.3, body=b"slow")) as up,
        start_sidecar(http_snapshot({"reviews": [("127.0.0.1", up.port)]})) as sc,
    ):
        req = asyncio.create_task(http_request(sc.port(), "GET", "http://reviews/"))
        await eventually(lambda: up.requests, what="the request in flight at the upstream")
        token = sc.extra["admin_token"]
        r = await http_request(
            sc.admin, "POST", "/drain", {"Host": "admin", "Authorization": f"Bearer {token}"}
        )
        assert r.status == 200
        resp = await req
        assert (resp.status, resp.body) == (200, b"slow")
        await asyncio.wait_for(sc.sidecar.stopped.wait(), 5)
        with pytest.raises(OSError):
            await http_request(sc.port(), "GET", "http://reviews/")


async def test_cli_subprocess_prints_ready_line_and_serves() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot({"reviews": [("127.0.0.1", up.port)]}, version="cli")
        async with start_sidecar_process(snap) as sc:
            assert sc.extra["event"] == "ready"
            assert set(sc.extra["listeners"]) == {"outbound"}
            r = await http_request(sc.port(), "GET", "http://reviews/x")
            assert r.status == 200
            r = await http_request(sc.admin, "GET", "/ready", {"Host": "admin"})
            assert r.status == 200
            sc.process.terminate()
            assert await asyncio.wait_for(sc.process.wait(), 15) == 0


def test_cli_reports_a_missing_snapshot_file() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "sidecar",
            "--snapshot",
            "/nonexistent/snap.json",
        ],
        check=False,
        capture_output=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert b"/nonexistent/snap.json" in res.stderr


async def test_listener_port_change_moves_the_listener() -> None:
    async with FakeUpstream() as up:
        p1, p2 = free_port(), free_port()
        base = http_snapshot({"reviews": [("127.0.0.1", up.port)]})

        def with_port(p: int, v: str):  # type: ignore[no-untyped-def]
            lst = msgspec.structs.replace(base.listeners[0], port=p)
            return msgspec.structs.replace(base, version=v, listeners=(lst,))

        async with start_sidecar(with_port(p1, "1")) as sc:
            assert (await http_request(p1, "GET", "http://reviews/")).status == 200
            sc.sidecar.apply(with_port(p2, "2"))
            await sc.sidecar.wait_listening()
            assert (await http_request(p2, "GET", "http://reviews/")).status == 200

            async def old_port_refuses() -> bool:
                try:
                    await http_request(p1, "GET", "http://reviews/")
                except OSError:
                    return True
                return False

            await eventually(old_port_refuses, what=f"old listener port {p1} closed")


async def test_idle_sidecar_process_stays_under_40_mb() -> None:
    async with FakeUpstream() as up:
        snap = http_snapshot({"reviews": [("127.0.0.1", up.port)]})
        async with start_sidecar_process(snap) as sc:
            await http_request(sc.port(), "GET", "http://reviews/")
            status = Path(f"/proc/{sc.process.pid}/status").read_text()
            rss_kb = next(
                int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")
            )
            assert rss_kb < 40 * 1024, f"idle RSS {rss_kb} kB"


async def test_removed_cluster_connections_close_after_in_flight_requests() -> None:
    from diktyo.testing import Response

    async with FakeUpstream(Response(delay=0.2, body=b"old")) as a, FakeUpstream() as b:
        first = http_snapshot({"reviews": [("127.0.0.1", a.port)]}, version="1")
        second = http_snapshot({"ratings": [("127.0.0.1", b.port)]}, version="2")
        async with start_sidecar(first) as sc:
            req = asyncio.create_task(http_request(sc.port(), "GET", "http://reviews/"))
            await eventually(lambda: a.open_conns, what="the request reached the old upstream")
            sc.sidecar.apply(second)  # the in-flight request's cluster disappears
            r = await req
            assert (r.status, r.body) == (200, b"old")  # finished on the old objects
            # and its upstream connection was not parked forever
            await eventually(lambda: not a.open_conns, what="old upstream connection closed")
            assert (await http_request(sc.port(), "GET", "http://reviews/")).status == 404
            assert (await http_request(sc.port(), "GET", "http://ratings/")).status == 200

"""WorkloadGroup probes as Istio's agent runs them: defaults, thresholds, real HTTP/TCP/exec checks."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

from diktyo.platform.ports import free_port
from diktyo.platform.probes import ProbeConfig, ProbeTracker, WorkloadProber
from diktyo.testing import eventually


def test_defaults_are_istios() -> None:
    cfg = ProbeConfig.from_json({"httpGet": {"port": 8080}})
    assert (cfg.method, cfg.host, cfg.path, cfg.scheme) == ("httpGet", "localhost", "/", "http")
    assert (cfg.period, cfg.timeout, cfg.initial_delay) == (10.0, 1.0, 0.0)
    assert (cfg.success_threshold, cfg.failure_threshold) == (1, 1)
    cfg = ProbeConfig.from_json({"tcpSocket": {"port": 5}, "failureThreshold": 3})
    assert (cfg.method, cfg.port, cfg.failure_threshold) == ("tcpSocket", 5, 3)


def test_tracker_reports_only_changes_after_thresholds() -> None:
    t = ProbeTracker(success_threshold=2, failure_threshold=3)
    assert [t.observe(True), t.observe(True)] == [None, True]  # healthy after 2 successes
    assert t.observe(True) is None  # no repeat
    assert [t.observe(False), t.observe(False), t.observe(True)] == [None, None, None]
    assert [t.observe(False), t.observe(False), t.observe(False)] == [None, None, False]
    assert t.observe(False) is None
    assert [t.observe(True), t.observe(False), t.observe(True), t.observe(True)] == [
        None,
        None,
        None,
        True,
    ]


async def _app(status: list[int]) -> tuple[web.AppRunner, int]:
    async def health(request: web.Request) -> web.Response:
        assert request.headers.get("x-probe") == "yes"
        return web.Response(status=status[0])

    app = web.Application()
    app.router.add_get("/healthz", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def test_http_probe_follows_the_app_and_maps_the_workload_port() -> None:
    status = [200]
    runner, port = await _app(status)
    cfg = ProbeConfig.from_json(
        {
            "periodSeconds": 1,
            "failureThreshold": 2,
            "httpGet": {"port": 9080, "path": "/healthz", "host": "127.0.0.1",
                        "httpHeaders": [{"name": "x-probe", "value": "yes"}]},
        }
    )  # fmt: skip
    cfg.period = 0.05
    changes: list[tuple[bool, str]] = []
    prober = WorkloadProber(cfg, lambda ok, why: changes.append((ok, why)), port_map={9080: port})
    task = asyncio.get_running_loop().create_task(prober.run())
    try:
        await eventually(lambda: changes, timeout=10, what="the first probe result")
        assert changes == [(True, "")]
        status[0] = 503
        await eventually(lambda: len(changes) == 2, timeout=10, what="the 503 noticed")
        assert changes[1][0] is False and "answered 503" in changes[1][1]
        status[0] = 302  # 2xx and 3xx are successes
        await eventually(lambda: len(changes) == 3, timeout=10, what="the 302 noticed")
        assert changes[2] == (True, "")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


async def test_tcp_and_exec_checks() -> None:
    async with aiohttp.ClientSession() as session:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tcp = WorkloadProber(
            ProbeConfig.from_json({"tcpSocket": {"port": port, "host": "127.0.0.1"}}), print
        )
        assert await tcp.check_once(session) == ""
        server.close()
        await server.wait_closed()
        assert "TCP probe 127.0.0.1" in await tcp.check_once(session)
        ok = WorkloadProber(
            ProbeConfig.from_json({"exec": {"command": [sys.executable, "-c", ""]}}), print
        )
        assert await ok.check_once(session) == ""
        bad = WorkloadProber(
            ProbeConfig.from_json(
                {"exec": {"command": [sys.executable, "-c", "raise SystemExit(3)"]}}
            ),
            print,
        )
        assert await bad.check_once(session) == "exec probe exited with code 3"


async def test_a_sidecar_that_is_not_ready_makes_the_workload_unhealthy() -> None:
    async with aiohttp.ClientSession() as session:
        prober = WorkloadProber(
            ProbeConfig.from_json({"exec": {"command": [sys.executable, "-c", ""]}}),
            print,
            sidecar_ready_url=f"http://127.0.0.1:{free_port()}/ready",
        )
        assert (await prober.check_once(session)).startswith("sidecar not ready")

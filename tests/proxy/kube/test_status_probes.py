"""The sidecar's status server as the kubelet sees it: readiness on 15021 and the app's own
probes rewritten to /app-health/... on 15020, forwarded to a real app over HTTP, HTTPS, TCP."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from diktyo.control.inject.certs import webhook_certs
from diktyo.control.inject.pod import PROXY, inject_pod
from diktyo.proxy.env import parse_app_probers
from diktyo.proxy.main import sidecar_ready
from diktyo.proxy.sidecar import Sidecar
from diktyo.proxy.status import MAX_BODY, StatusServer
from diktyo.testing.snapshots import http_snapshot

Seen = list[web.Request]


async def _app(routes: dict[str, Any], tls: ssl.SSLContext | None = None
               ) -> tuple[web.AppRunner, int, Seen]:
    seen: Seen = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, fn in routes.items():
        app.router.add_get(path, fn)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    return runner, int(runner.addresses[0][1]), seen


@pytest.fixture
async def status() -> AsyncIterator[StatusServer]:
    server = StatusServer(lambda: True, lambda: "envoy_server_live 1\n", {}, "127.0.0.1")
    await server.start("127.0.0.1", 0, 0)
    yield server
    server.close()


async def _get(port: int, path: str, headers: dict[str, str] | None = None,
               method: str = "GET") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.request(
            method, f"http://127.0.0.1:{port}{path}", headers=headers or {}) as r:
        return r.status, await r.read()


async def test_readiness_follows_the_sidecar() -> None:
    sc = Sidecar(asyncio.get_running_loop())
    server = StatusServer(lambda: sidecar_ready(sc), lambda: "", {}, "127.0.0.1")
    await server.start("127.0.0.1", 0, 0)
    try:
        assert (await _get(server.readiness_port, "/healthz/ready"))[0] == 503  # no snapshot
        sc.apply(http_snapshot({"web": [("127.0.0.1", 1)]}, port=0))
        await sc.wait_listening()
        assert (await _get(server.readiness_port, "/healthz/ready"))[0] == 200
        assert (await _get(server.status_port, "/healthz/ready"))[0] == 200
        # the readiness port answers nothing else (it is reachable on the pod IP)
        assert (await _get(server.readiness_port, "/stats/prometheus"))[0] == 404
        sc.draining = True
        assert (await _get(server.readiness_port, "/healthz/ready"))[0] == 503
    finally:
        server.close()
        await sc.stop()


async def test_http_probe_forwards_status_body_and_headers(status: StatusServer) -> None:
    state = {"code": 503}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["code"], text="x" * (MAX_BODY + 500))

    runner, port, seen = await _app({"/health": health})
    status.probers = parse_app_probers(json.dumps(
        {"/app-health/web/readyz": {"httpGet": {"path": "/health", "port": port}}}))
    try:
        host = f"10.0.0.9:{status.status_port}"
        code, body = await _get(status.status_port, "/app-health/web/readyz",
                                {"User-Agent": "kube-probe/1.30", "X-Custom": "yes", "Host": host})
        assert code == 503 and body == b"x" * MAX_BODY  # status passed, body capped at 10 KiB
        state["code"] = 200
        code, _ = await _get(status.status_port, "/app-health/web/readyz")
        assert code == 200
        first = seen[0]
        assert first.headers["User-Agent"] == "kube-probe/1.30" and first.headers["X-Custom"] == "yes"
        assert first.headers["Host"] == f"10.0.0.9:{port}"  # the status port swapped for the app's
        assert first.remote == "127.0.0.6"  # Istio's passthrough source: never captured
        assert status.probes == 2 and status.probe_failures == 1
    finally:
        await runner.cleanup()


async def test_redirects_like_the_kubelet(status: StatusServer) -> None:
    async def here(request: web.Request) -> web.Response:
        raise web.HTTPFound("/final")

    async def away(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.invalid/elsewhere")

    async def final(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    runner, port, seen = await _app({"/here": here, "/away": away, "/final": final, "/loop": loop})
    status.probers = parse_app_probers(json.dumps({
        "/app-health/a/readyz": {"httpGet": {"path": "/here", "port": port}},
        "/app-health/a/livez": {"httpGet": {"path": "/away", "port": port}},
        "/app-health/a/startupz": {"httpGet": {"path": "/loop", "port": port}}}))
    try:
        assert (await _get(status.status_port, "/app-health/a/readyz"))[0] == 204  # followed
        assert (await _get(status.status_port, "/app-health/a/livez"))[0] == 200  # elsewhere: ok
        assert (await _get(status.status_port, "/app-health/a/startupz"))[0] == 500  # >10 hops
        assert [r.path for r in seen[:2]] == ["/here", "/final"]
        assert not any(r.host.startswith("example.invalid") for r in seen)
    finally:
        await runner.cleanup()


async def test_https_probe_without_verification(status: StatusServer, tmp_path: Path) -> None:
    certs = webhook_certs("web", "shop")
    (tmp_path / "c.pem").write_bytes(certs.cert_pem)
    (tmp_path / "k.pem").write_bytes(certs.key_pem)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="tls ok")

    runner, port, _ = await _app({"/ok": ok}, tls)
    status.probers = parse_app_probers(json.dumps(
        {"/app-health/web/livez": {"httpGet": {"path": "/ok", "port": port, "scheme": "HTTPS"}}}))
    try:
        assert await _get(status.status_port, "/app-health/web/livez") == (200, b"tls ok")
    finally:
        await runner.cleanup()


async def test_timeouts_refusals_and_tcp(status: StatusServer) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)  # real time: a handler slower than the probe's timeout
        return web.Response()

    runner, port, _ = await _app({"/slow": slow})
    closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    free = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    status.probers = parse_app_probers(json.dumps({
        "/app-health/a/readyz": {"httpGet": {"path": "/slow", "port": port}, "timeoutSeconds": 1},
        "/app-health/a/livez": {"httpGet": {"path": "/", "port": free}},
        "/app-health/b/readyz": {"tcpSocket": {"port": port}},
        "/app-health/b/livez": {"tcpSocket": {"port": free}}}))
    try:
        code, body = await _get(status.status_port, "/app-health/a/readyz")
        assert code == 500 and b"timed out after 1s" in body
        assert (await _get(status.status_port, "/app-health/a/livez"))[0] == 500  # refused
        assert (await _get(status.status_port, "/app-health/b/readyz"))[0] == 200  # port open
        assert (await _get(status.status_port, "/app-health/b/livez"))[0] == 500  # closed
    finally:
        await runner.cleanup()


async def test_bad_requests(status: StatusServer) -> None:
    code, body = await _get(status.status_port, "/app-health/nobody/readyz")
    assert code == 400 and b"does not exist for /app-health/nobody/readyz" in body  # as Istio
    assert (await _get(status.status_port, "/app-health/x/readyz", method="POST"))[0] == 405
    assert (await _get(status.status_port, "/nothing"))[0] == 404
    code, body = await _get(status.status_port, "/stats/prometheus")
    assert code == 200 and body == b"envoy_server_live 1\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", status.status_port)
    writer.write(b"HEAD /stats/prometheus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")  # no body
    assert b"content-length: 20\r\n" in answer
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", status.status_port)
    writer.write(b"GARBAGE\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", status.readiness_port)
    writer.write(b"POST /healthz/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert (await reader.read()).startswith(b"HTTP/1.1 400 ")  # never reaches anything
    writer.close()


async def test_kubelet_follows_the_injected_probe_to_the_app(status: StatusServer) -> None:
    """Inject a pod, then probe the way the kubelet would with the rewritten probe."""

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready", headers={"X-Seen": request.headers.get("X-Probe", "")})

    runner, port, seen = await _app({"/ready": ready})
    pod = {"metadata": {"name": "w", "namespace": "ns"}, "spec": {"containers": [{
        "name": "web", "image": "w", "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTPS",
                                       "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                           "periodSeconds": 7},
        "livenessProbe": {"tcpSocket": {"port": port}, "timeoutSeconds": 3},
        "startupProbe": {"exec": {"command": ["true"]}},
    }]}}  # fmt: skip
    out = inject_pod(pod)
    app, proxy = out["spec"]["containers"]
    assert proxy["name"] == PROXY
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    status.probers = parse_app_probers(env["DIKTYO_KUBE_APP_PROBERS"])
    status.probers["/app-health/web/readyz"]["httpGet"]["scheme"] = "HTTP"  # the test app is plain
    rp = app["readinessProbe"]
    assert rp["periodSeconds"] == 7 and rp["httpGet"]["port"] == 15020
    assert rp["httpGet"]["scheme"] == "HTTP" and rp["httpGet"]["path"] == "/app-health/web/readyz"
    assert app["livenessProbe"] == {"timeoutSeconds": 3, "httpGet": {
        "path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"}}
    assert app["startupProbe"] == {"exec": {"command": ["true"]}}  # exec probes are left alone
    headers = {h["name"]: h["value"] for h in rp["httpGet"]["httpHeaders"]}
    headers["User-Agent"] = "kube-probe/1.30"
    code, body = await _get(status.status_port, rp["httpGet"]["path"], headers)
    assert (code, body) == (200, b"ready") and seen[-1].headers["X-Probe"] == "1"
    code, _ = await _get(status.status_port, app["livenessProbe"]["httpGet"]["path"])
    assert code == 200
    await runner.cleanup()
    code, _ = await _get(status.status_port, app["livenessProbe"]["httpGet"]["path"])
    assert code == 500  # the app is gone: the kubelet sees the liveness probe fail


async def test_grpc_probe_asks_the_health_service(status: StatusServer) -> None:
    grpc = pytest.importorskip("grpc", reason="grpcio is a test dependency")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for name, state in (("", serving), ("cart", not_serving)):
        result = servicer.set(name, state)
        if asyncio.iscoroutine(result):
            await result
    closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    free = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    status.probers = parse_app_probers(json.dumps({
        "/app-health/api/readyz": {"grpc": {"port": port}},
        "/app-health/api/livez": {"grpc": {"port": port, "service": "cart"}},
        "/app-health/api/startupz": {"grpc": {"port": port, "service": "unknown"}},
        "/app-health/gone/readyz": {"grpc": {"port": free}}}))
    try:
        assert (await _get(status.status_port, "/app-health/api/readyz"))[0] == 200
        code, body = await _get(status.status_port, "/app-health/api/livez")
        assert code == 500 and b"NOT_SERVING" in body
        code, body = await _get(status.status_port, "/app-health/api/startupz")
        assert code == 500 and b"unknown service" in body  # NOT_FOUND status, no message
        assert (await _get(status.status_port, "/app-health/gone/readyz"))[0] == 500
        result = servicer.set("", not_serving)
        if asyncio.iscoroutine(result):
            await result
        assert (await _get(status.status_port, "/app-health/api/readyz"))[0] == 500
    finally:
        await server.stop(None)


def test_grpc_probes_are_rewritten() -> None:
    pod = {"metadata": {"name": "g", "namespace": "ns"}, "spec": {"containers": [{
        "name": "api", "image": "a", "ports": [{"containerPort": 9090}],
        "livenessProbe": {"grpc": {"port": 9090, "service": "cart"}, "periodSeconds": 3}}]}}
    app, proxy = inject_pod(pod)["spec"]["containers"]
    assert app["livenessProbe"] == {"periodSeconds": 3, "httpGet": {
        "path": "/app-health/api/livez", "port": 15020, "scheme": "HTTP"}}
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert json.loads(env["DIKTYO_KUBE_APP_PROBERS"]) == {
        "/app-health/api/livez": {"grpc": {"port": 9090, "service": "cart"}}}

"""The sidecar in a pod: DIKTYO_* environment -> options (one table), clear errors, and a real
sidecar process started with nothing but the environment the injector sets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from diktyo.control.ingest.kubernetes import TokenReviewer, use_token_review
from diktyo.control.inject.pod import PROXY, inject_pod
from diktyo.control.model import ProxyNode
from diktyo.control.server import ControlPlane
from diktyo.proxy.env import ENV_VARS, EnvError, parse_app_probers, sidecar_env
from diktyo.proxy.main import SidecarOptions
from diktyo.snapshot.model import Node
from diktyo.testing.kube_api import FakeApiServer
from diktyo.testing.wait import eventually

POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-5d8f7-abcde", "namespace": "shop",
                 "labels": {"app": "web", "version": "v2"}},
    "spec": {"serviceAccountName": "web", "containers": [{
        "name": "web", "image": "web:1",
        "ports": [{"containerPort": 8080, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "timeoutSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": 8080}},
    }]},
}  # fmt: skip


def _injected_env(pod: dict[str, Any], **downward: str) -> dict[str, str]:
    """The env of the injected diktyo-proxy container, as the kubelet would set it."""
    out = inject_pod(pod)
    (proxy,) = [c for c in out["spec"]["containers"] if c["name"] == PROXY]
    env: dict[str, str] = {}
    for item in proxy["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = downward[path]
    return env


def test_every_variable_the_injector_sets_is_read() -> None:
    env = _injected_env(POD, **{"metadata.name": "web-5d8f7-abcde", "metadata.namespace": "shop",
                                "status.podIP": "10.1.2.3", "status.hostIP": "192.0.2.1",
                                "spec.serviceAccountName": "web"})
    known = {v.name for v in ENV_VARS} | {"DIKTYO_KUBE_APP_PROBERS", "DIKTYO_INTERCEPTION_MODE",
                                          "DIKTYO_HOME",
                                          "POD_NAME", "POD_NAMESPACE", "HOST_IP", "SERVICE_ACCOUNT"}
    unread = [k for k in env if k not in known and not k.startswith("DIKTYO_META_")]
    assert unread == [], f"the injector sets variables nothing reads: {unread}"
    opts = sidecar_env(env)
    assert opts["node"] == "web-5d8f7-abcde.shop"
    assert opts["control_plane"] == "http://diktyo.diktyo-system.svc:15010"
    assert opts["admin_port"] == 15000 and opts["admin_address"] == "127.0.0.1"
    assert opts["status_port"] == 15020 and opts["readiness_port"] == 15021
    assert "status_address" not in opts and SidecarOptions().status_address == "0.0.0.0"
    assert opts["pod_ip"] == "10.1.2.3"
    assert "outbound_port" not in opts and opts["log_level"] == "warning"  # 15001 is capture's
    assert opts["trust_domain"] == "cluster.local" and opts["tracing_sampling"] == 1.0
    assert opts["metadata"]["WORKLOAD_NAME"] == "web"
    assert opts["app_probers"] == {
        "/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                                   "timeoutSeconds": 2},
        "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIKTYO_ADMIN_PORT": "abc"}, "DIKTYO_ADMIN_PORT='abc': expected a TCP port number"),
        ({"DIKTYO_STATUS_PORT": "70000"}, "DIKTYO_STATUS_PORT='70000'"),
        ({"DIKTYO_STATUS_ADDRESS": "localhost"}, "expected an IP address"),
        ({"DIKTYO_CONTROL_PLANE": "diktyo:15010"}, "expected a URL like http://"),
        ({"DIKTYO_LOG_LEVEL": "loud"}, "expected one of debug, info, warning, error"),
        ({"DIKTYO_TRACING_SAMPLING": "150"}, "percentage from 0 to 100"),
        ({"DIKTYO_DRAIN_TIMEOUT": "-1"}, "expected seconds"),
        ({"DIKTYO_TRUST_DOMAIN": "Not A Domain"}, "trust domain"),
        ({"DIKTYO_NODE": " "}, "set but empty"),
        ({"DIKTYO_META_POD_PORTS": "[{\"port\": 1}]"}, "containerPort"),
        ({"DIKTYO_KUBE_APP_PROBERS": "{"}, "DIKTYO_KUBE_APP_PROBERS: not JSON"),
        ({"DIKTYO_KUBE_APP_PROBERS": '{"/healthz": {"httpGet": {"port": 1}}}'}, "must be /app-health/"),
        ({"DIKTYO_KUBE_APP_PROBERS": '{"/app-health/a/livez": {"httpGet": {"port": "http"}}}'},
         "named ports are resolved"),
        ({"DIKTYO_KUBE_APP_PROBERS": '{"/app-health/a/livez": {}}'}, "exactly one of httpGet"),
        ({"DIKTYO_KUBE_APP_PROBERS": '{"/app-health/a/livez": {"tcpSocket": {"port": 1}}}',
          "DIKTYO_META_APP_CONTAINERS": "b"}, "names container 'a'"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvError) as info:
        sidecar_env(env)
    assert message in str(info.value)


def test_istio_variable_and_defaults() -> None:
    assert sidecar_env({}) == {}
    assert sidecar_env({"INSTANCE_IP": ""}) == {}  # the pod has no IP yet
    probers = '{"/app-health/hello/readyz":{"httpGet":{"path":"x","port":80,"scheme":"HTTPS"}}}'
    got = sidecar_env({"ISTIO_KUBE_APP_PROBERS": probers, "DIKTYO_LOG_LEVEL": "warn"})
    assert got["app_probers"]["/app-health/hello/readyz"]["httpGet"] == {
        "path": "/x", "port": 80, "scheme": "HTTPS"}
    assert got["log_level"] == "warning"
    assert parse_app_probers('{"/app-health/g/startupz": {"grpc": {"port": 9000}}}') == {
        "/app-health/g/startupz": {"grpc": {"port": 9000, "service": ""}, "timeoutSeconds": 1}}


async def _run(env: dict[str, str], timeout: float = 30.0) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        err = await proc.stderr.read() if proc.stderr else b""
        raise AssertionError(f"sidecar exited before ready: {err.decode(errors='replace')}")
    return proc, json.loads(line)


def _listen_address(port: int) -> str:
    """The local address a listening TCP socket on ``port`` is bound to (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, port_hex = fields[1].split(":")
        if int(port_hex, 16) == port and fields[3] == "0A":  # LISTEN
            raw = bytes.fromhex(addr)[::-1]
            return ".".join(str(b) for b in raw)
    raise AssertionError(f"nothing listens on {port}")


async def test_real_sidecar_started_with_only_the_environment(tmp_path: Path) -> None:
    hits: list[str] = []

    async def ready(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="app ready")

    app = web.Application()
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app_port = runner.addresses[0][1]

    api = FakeApiServer(token="cp-token")  # answers the TokenReview for the pod's token
    projected = api.issue("system:serviceaccount:shop:web", ("diktyo-ca",))
    await api.start()
    reviewer = TokenReviewer(api.url, token="cp-token")
    cp = ControlPlane(observability=False, sidecar_auth=False)
    use_token_review(cp, reviewer)
    await cp.start()
    cp.add_proxy(ProxyNode(node=Node(id="web-5d8f7-abcde.shop", workload="web", namespace="shop",
                                     service_account="web")))
    pod = json.loads(json.dumps(POD))
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = app_port
    pod["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["port"] = app_port
    env = _injected_env(pod, **{"metadata.name": "web-5d8f7-abcde", "metadata.namespace": "shop",
                                "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
                                "spec.serviceAccountName": "web"})
    env.update(DIKTYO_CONTROL_PLANE=cp.url, DIKTYO_ADMIN_PORT="0", DIKTYO_STATUS_PORT="0",
               DIKTYO_READINESS_PORT="0", DIKTYO_OUTBOUND_PORT="0", DIKTYO_TRACING_SAMPLING="0.5",
               DIKTYO_LOG_LEVEL="info", DIKTYO_KUBE_TOKEN_FILE=str(tmp_path / "projected-token"))
    (tmp_path / "projected-token").write_text(projected + "\n")
    env.pop("DIKTYO_INTERCEPTION_MODE", None)  # capture listeners are not this test's subject
    env["DIKTYO_HOME"] = str(tmp_path / "home")  # the pod's memory volume
    env.update({k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME") if k in os.environ})
    proc, line = await _run(env)
    try:
        assert _listen_address(line["admin"]) == "127.0.0.1"  # the admin port stays private
        # the admin token went to DIKTYO_HOME (the pod's memory volume), not the read-only root
        assert line["admin_token_file"].startswith(str(tmp_path / "home" / "sidecars"))
        assert _listen_address(line["status"]) == "0.0.0.0"  # the kubelet probes the pod IP
        assert _listen_address(line["readiness"]) == "0.0.0.0"
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{line['readiness']}"
            async with s.get(base + "/healthz/ready") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{line['status']}/app-health/web/readyz") as r:
                assert r.status == 200 and await r.text() == "app ready"
            async with s.get(f"http://127.0.0.1:{line['status']}/app-health/web/livez") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{line['admin']}/config_dump") as r:
                dump = await r.json()
        assert hits == ["/ready"]
        assert dump["node"]["id"] == "web-5d8f7-abcde.shop"
        assert dump["mesh"]["tracing"]["sampling"] == 0.5  # DIKTYO_TRACING_SAMPLING applied
        # its workload certificate came with the projected token, for POD_NAMESPACE/SERVICE_ACCOUNT
        assert cp.identity.service.issued == 1
        assert [r["spec"]["token"] for r in api.reviews] == [projected]
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        await cp.stop()
        await reviewer.close()
        await api.close()
        await runner.cleanup()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert "workload certificate for spiffe://cluster.local/ns/shop/sa/web installed" in err.decode()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DIKTYO_CONTROL_PLANE": "http://127.0.0.1:1", "DIKTYO_NODE": "a.b",
          "DIKTYO_ADMIN_PORT": "admin"}, "DIKTYO_ADMIN_PORT='admin'"),
        ({"DIKTYO_CONTROL_PLANE": "http://127.0.0.1:1"}, "needs --node ID (or DIKTYO_NODE"),
        ({}, "no config source"),
    ],
)
async def test_bad_environment_exits_2_with_the_reason(env: dict[str, str], message: str) -> None:
    base = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME") if k in os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and out == b""
    assert message in err.decode(), err


async def test_flags_override_the_environment(tmp_path: Path) -> None:
    import argparse

    from diktyo.cli.sidecar import add_arguments, resolve

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--admin-port", "7", "--log-level", "debug"])
    got = resolve(args, {"DIKTYO_ADMIN_PORT": "15000", "DIKTYO_LOG_LEVEL": "error",
                         "DIKTYO_CONTROL_PLANE": "http://cp:15010", "DIKTYO_NODE": "x.y"})
    assert got["admin_port"] == 7 and got["log_level"] == "debug"
    assert got["control_plane"] == "http://cp:15010" and got["node"] == "x.y"
    got = resolve(p.parse_args(["--snapshot", "s.json"]), {"DIKTYO_CONTROL_PLANE": "http://cp"})
    assert "control_plane" not in got and got["admin_port"] == 0 and got["drain_timeout"] == 10.0
    await eventually(lambda: True)


async def test_missing_projected_token_is_named(tmp_path: Path) -> None:
    base = {k: os.environ[k] for k in ("PATH", "PYTHONPATH", "HOME") if k in os.environ}
    env = {**base, "DIKTYO_CONTROL_PLANE": "http://127.0.0.1:1", "DIKTYO_NODE": "a.b",
           "DIKTYO_KUBE_TOKEN_FILE": str(tmp_path / "nope"),
           "DIKTYO_ADMIN_TOKEN_FILE": str(tmp_path / "admin")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.proxy", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and out == b""
    assert f"cannot read the service-account token {tmp_path / 'nope'}" in err.decode()


def test_pod_overrides_sampling_and_trust_domain(caplog: pytest.LogCaptureFixture) -> None:
    from diktyo.proxy.main import pod_overrides
    from diktyo.testing.snapshots import http_snapshot

    snap = http_snapshot({"web": [("127.0.0.1", 1)]})
    opts = SidecarOptions(tracing_sampling=2.5, trust_domain="corp.example", outbound_port=0)
    with caplog.at_level("WARNING", logger="diktyo.proxy"):
        out = pod_overrides(snap, opts)
        pod_overrides(snap, opts)
    assert out.mesh.tracing.sampling == 2.5 and snap.mesh.tracing.sampling != 2.5
    assert next(lst.port for lst in out.listeners if lst.direction == "outbound") == 0
    warnings = [r for r in caplog.records if "DIKTYO_TRUST_DOMAIN" in r.getMessage()]
    assert len(warnings) == 1 and "'cluster.local'" in warnings[0].getMessage()  # once
    assert pod_overrides(snap, SidecarOptions()) == snap  # nothing set: unchanged

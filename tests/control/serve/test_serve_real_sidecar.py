"""The real sidecar against the control plane: it keeps serving while the control plane is away
and picks up a restarted control plane's config."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import pytest
from aiohttp import web

from diktyo.control.model import ProxyNode, Service, ServicePort, WorkloadInstance
from diktyo.control.server import ControlPlane
from diktyo.platform.ports import free_port
from diktyo.security.admin_token import write_secret
from diktyo.snapshot.model import Node
from diktyo.testing import eventually
from diktyo.testing.controlplane import admin_session, cli_env

SVC = Service(
    hostname="hello.default.svc.cluster.local", short_name="hello", ports=(ServicePort(9080),)
)
NODE = ProxyNode(node=Node(id="client-1.default", workload="client"), outbound_port=0)


async def _upstream(text: str) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def _instance(name: str, port: int) -> WorkloadInstance:
    return WorkloadInstance(
        name=name, workload=name, address="127.0.0.1", ports={9080: port}, services=(SVC.hostname,)
    )


KEY = b"k" * 32  # the bootstrap-token key, kept across the control plane's restart


async def _plane(port: int, upstream_port: int, outbound: int) -> ControlPlane:
    cp = ControlPlane(poll_timeout=2.0, token_key=KEY)
    await cp.start(port=port)
    cp.registry.add_service(SVC)
    cp.registry.add_instance(_instance(f"hello-{upstream_port}", upstream_port))
    cp.add_proxy(ProxyNode(node=NODE.node, outbound_port=outbound))
    return cp


async def _get(session: aiohttp.ClientSession, outbound: int) -> tuple[int, str]:
    async with session.get("http://hello:9080/", proxy=f"http://127.0.0.1:{outbound}") as r:
        return r.status, await r.text()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_sidecar_keeps_serving_without_control_plane_and_resyncs(tmp_path) -> None:
    up1, p1 = await _upstream("one")
    up2, p2 = await _upstream("two")
    cp_port, admin, outbound = free_port(), free_port(), free_port()
    cp = await _plane(cp_port, p1, outbound)
    token = tmp_path / "token"
    write_secret(token, cp.sidecar_token(NODE))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "diktyo.cli.main",
        "sidecar",
        "--control-plane",
        cp.url,
        "--node",
        NODE.node.id,
        "--token-file",
        str(token),
        "--admin-port",
        str(admin),
        stdout=asyncio.subprocess.PIPE,
    )
    cp2: ControlPlane | None = None
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert json.loads(line)["event"] == "ready"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            assert await _get(s, outbound) == (200, "one")
            await cp.stop()
            await asyncio.sleep(1.0)  # real time: the sidecar notices and retries with backoff
            assert await _get(s, outbound) == (200, "one")
            async with s.get(f"http://127.0.0.1:{admin}/ready") as r:
                assert r.status == 200
            cp2 = await _plane(cp_port, p2, outbound)
            await eventually(
                lambda: cp2.status[NODE.node.id].state == "SYNCED", timeout=20, what="SYNCED again"
            )
            assert cp2.status[NODE.node.id].state == "SYNCED"
            assert await _get(s, outbound) == (200, "two")
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        if cp2 is not None:
            await cp2.stop()
        await cp.stop()
        await up1.cleanup()
        await up2.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_real_sidecar_nack_is_reported_by_proxy_status(tmp_path) -> None:
    import socket

    from diktyo.snapshot.model import Listener, RouteTable, Snapshot

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    state = {"bad": False}

    def translate(proxy: ProxyNode, push: object) -> Snapshot:
        port = busy.getsockname()[1] if state["bad"] else proxy.outbound_port
        listener = Listener(name="outbound", direction="outbound", port=port, route_table="out")
        return Snapshot(
            version="",
            node=proxy.node,
            listeners=(listener,),
            route_tables=(RouteTable(name="out"),),
        )

    cp = ControlPlane(translator=translate, observability=False, poll_timeout=2.0)
    await cp.start()
    node = ProxyNode(node=Node(id="a-1.default", workload="a"), outbound_port=free_port())
    cp.add_proxy(node)
    token = tmp_path / "token"
    write_secret(token, cp.sidecar_token(node))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "diktyo.cli.main",
        "sidecar",
        "--control-plane",
        cp.url,
        "--node",
        "a-1.default",
        "--token-file",
        str(token),
        "--admin-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))["event"] == "ready"
        # "ready" is printed before the ACK reaches the control plane
        await eventually(lambda: cp.status["a-1.default"].state == "SYNCED", timeout=5)
        good = cp.status["a-1.default"].acked
        assert good
        state["bad"] = True
        cp.kick()
        await eventually(lambda: cp.status["a-1.default"].state == "NACK", timeout=5)
        st = cp.status["a-1.default"]
        assert st.state == "NACK" and "cannot bind" in st.error and st.acked == good
        out = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "proxy-status",
            "--control-plane",
            cp.url,
            stdout=asyncio.subprocess.PIPE,
            env=cli_env(cp, tmp_path / "home"),
        )
        text = (await out.communicate())[0].decode()
        assert out.returncode == 4
        assert "a-1.default" in text and "NACK (listener 'outbound': cannot bind" in text, text
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
        await cp.stop()
        busy.close()


ROUTE_TO_V2 = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello}
spec:
  host: hello
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello}
spec:
  hosts: [hello]
  http:
  - route:
    - destination: {host: hello, subset: v2}
"""


async def _run_cli(cp: ControlPlane, home: object, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", *args, "--control-plane", cp.url,
        env=cli_env(cp, home), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_apply_wait_returns_once_every_sidecar_serves_the_change(tmp_path) -> None:
    """``diktyo apply --wait``: the first request after it already takes the new route (the
    push is not left to the debounce), and a sidecar that never ACKs makes it exit 1 by name."""
    import dataclasses

    up1, p1 = await _upstream("one")
    up2, p2 = await _upstream("two")
    outbound = free_port()
    cp = ControlPlane(poll_timeout=2.0, observability=False)
    cp.debouncer.quiet = 2.0  # a slow debounce: only --wait's push can be seen at once
    await cp.start()
    cp.registry.add_service(SVC)
    for port, version in ((p1, "v1"), (p2, "v2")):
        inst = _instance(f"hello-{version}", port)
        cp.registry.add_instance(dataclasses.replace(inst, labels={"version": version}))
    cp.add_proxy(ProxyNode(node=NODE.node, outbound_port=outbound))
    token = tmp_path / "token"
    write_secret(token, cp.sidecar_token(NODE))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "diktyo.cli.main", "sidecar", "--control-plane", cp.url,
        "--node", NODE.node.id, "--token-file", str(token), "--admin-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))["event"] == "ready"
        await eventually(lambda: cp.status[NODE.node.id].state == "SYNCED", timeout=10)
        (tmp_path / "v2.yaml").write_text(ROUTE_TO_V2)
        rc, out, err = await _run_cli(
            cp, tmp_path / "h", "apply", "-f", str(tmp_path / "v2.yaml"), "--wait"
        )
        assert rc == 0, err
        assert "virtualservice/hello (default) applied" in out
        assert "distributed to 1 of 1 sidecars" in out, out
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            assert [await _get(s, outbound) for _ in range(10)] == [(200, "two")] * 10

        # a sidecar that never connects: --wait gives up after its seconds and names it
        cp.add_proxy(ProxyNode(node=Node(id="ghost-1.default", workload="ghost"), outbound_port=0))
        rc, out, err = await _run_cli(
            cp, tmp_path / "h", "delete", "-f", str(tmp_path / "v2.yaml"), "--wait", "1"
        )
        assert rc == 1
        assert "virtualservice/hello (default) deleted" in out
        assert "distributed to 1 of 2 sidecars within 1s" in err, err
        assert "ghost-1.default (NOT CONNECTED)" in err, err
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            assert {(await _get(s, outbound))[1] for _ in range(20)} == {"one", "two"}

        async with admin_session(cp) as s:  # a wait that is not seconds: 400, nothing applied
            before = cp.store.generation
            yaml = {"Content-Type": "application/yaml"}
            async with s.post(f"{cp.url}/v1/config?wait=soon", data=ROUTE_TO_V2, headers=yaml) as r:
                assert r.status == 400 and "give seconds" in (await r.json())["error"]
            assert cp.store.generation == before
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
        await cp.stop()
        await up1.cleanup()
        await up2.cleanup()

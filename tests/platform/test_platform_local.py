"""Local platform: a small mesh of tiny apps behind stand-in sidecars, started and stopped in order."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import sys
from pathlib import Path

import aiohttp
import pytest

from diktyo.control.model import ProxyNode, PushContext
from diktyo.platform.mesh import load_mesh_text
from diktyo.platform.state import pid_alive
from diktyo.platform.supervisor import LocalMesh
from diktyo.snapshot.model import (
    Cluster,
    Endpoint,
    Listener,
    Route,
    RouteTable,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)
from diktyo.testing import eventually
from diktyo.testing.controlplane import admin_headers

HELPERS = Path(__file__).parent / "helpers"
TINY_APP = Path(__file__).parents[1] / "e2e" / "apps" / "tiny_app.py"  # shared with e2e tests

MESH = f"""
name: tiny
restart: {{policy: Never}}  # this test checks what happens when nothing restarts
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
  - name: front
    ports: [{{name: http-web, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello, version: v1}}
    replicas: 2
    command: ["{{python}}", "{TINY_APP}"]
  - name: front-v1
    labels: {{app: front, version: v1}}
    command: ["{{python}}", "{TINY_APP}"]
gateways:
  - ports: [{{port: 8080, hostPort: 0}}]
"""


def tiny_translate(proxy: ProxyNode, push: PushContext) -> Snapshot:
    clusters, vhosts = [], []
    for svc in push.registry.services:
        name = f"outbound|9080||{svc.hostname}"
        eps = tuple(
            Endpoint(address=i.address, port=i.ports[9080])
            for i in push.registry.instances
            if svc.hostname in i.services
        )
        clusters.append(Cluster(name=name, endpoints=eps))
        vhosts.append(
            VirtualHost(
                name=svc.hostname,
                domains=(svc.short_name, f"{svc.short_name}:9080"),
                routes=(Route(clusters=(WeightedCluster(cluster=name),)),),
            )
        )
    listeners = []
    if proxy.node.mode == "gateway":
        gw_hosts = tuple(
            VirtualHost(name="gw", domains=(f"127.0.0.1:{p}",), routes=vhosts[0].routes)
            for p in proxy.gateway_ports.values()
        )
        vhosts = [*vhosts, *gw_hosts]
        for sp, hp in proxy.gateway_ports.items():
            listeners.append(
                Listener(name=f"gw-{sp}", direction="gateway", port=hp, route_table="out")
            )
    else:
        listeners.append(
            Listener(
                name="outbound", direction="outbound", port=proxy.outbound_port, route_table="out"
            )
        )
    for ib in proxy.inbound:
        cname = f"inbound|{ib.service_port}||"
        clusters.append(
            Cluster(
                name=cname,
                direction="inbound",
                endpoints=(Endpoint(address="127.0.0.1", port=ib.app_port),),
            )
        )
        listeners.append(
            Listener(
                name=f"in-{ib.service_port}",
                direction="inbound",
                port=ib.listen_port,
                cluster=cname,
            )
        )
    return Snapshot(
        version="",
        node=proxy.node,
        listeners=tuple(listeners),
        route_tables=(RouteTable(name="out", virtual_hosts=tuple(vhosts)),),
        clusters=tuple(clusters),
    )


def fake_sidecar(url: str, node: str, admin: int) -> list[str]:
    return [
        sys.executable,
        str(HELPERS / "fake_sidecar.py"),
        "--control-plane",
        url,
        "--node",
        node,
        "--admin-port",
        str(admin),
    ]


@pytest.mark.slow
async def test_up_request_through_sidecars_then_down_leaves_nothing() -> None:
    spec = load_mesh_text(MESH, "tiny.yaml", base_dir=str(HELPERS))
    out = io.StringIO()
    mesh = LocalMesh(
        spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=out, ready_timeout=20
    )
    try:
        await asyncio.wait_for(mesh.start(), 40)
        text = out.getvalue()
        assert "starting 3 workloads (4 replicas)" in text and "(3/3)" in text
        assert mesh.state == "ready"
        front = mesh.replica("front-v1-1")
        # the bootstrap token reaches the sidecar in a 0600 file, not in its environment
        # (which any process of the user can read in /proc/PID/environ)
        assert front.sidecar is not None and front.sidecar.pid is not None
        environ = Path(f"/proc/{front.sidecar.pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
        assert "DIKTYO_CA_TOKEN" not in env
        token_file = Path(env["DIKTYO_CA_TOKEN_FILE"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert mesh.cp.identity.tokens.verify(token).endswith("/sa/default")
        assert not any(token in v for v in env.values())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            # front's app calls hello through its own sidecar (HTTP_PROXY) -> hello's sidecar -> app
            seen = set()
            for _ in range(6):
                async with s.get(f"http://127.0.0.1:{front.app_ports[9080]}/call/hello:9080/") as r:
                    assert r.status == 200, await r.text()
                    seen.add(json.loads(await r.read())["pod"])
            assert seen == {"hello-v1-1", "hello-v1-2"}
            async with s.get(mesh.gateway_url() + "/") as r:
                assert r.status == 200
            async with s.get(mesh.cp.url + "/v1/workloads", headers=admin_headers(mesh.cp)) as r:
                states = {w["name"]: w["state"] for w in (await r.json())["workloads"]}
            assert states == {
                "hello-v1-1": "ready",
                "hello-v1-2": "ready",
                "front-v1-1": "ready",
                "istio-ingressgateway": "ready",
            }
        assert "[hello-v1-1] listening on" in out.getvalue()
        # a sidecar whose admin /ready stops answering takes its instance out of the endpoints
        mesh.cp.health_interval = 0.2
        hello1 = mesh.replica("hello-v1-1")
        assert hello1.sidecar is not None and hello1.sidecar.proc is not None
        hello1.sidecar.proc.kill()
        await eventually(
            lambda: not mesh.cp.registry.instances["hello-v1-1"].healthy,
            timeout=15,
            what="hello-v1-1 marked unhealthy",
        )
        assert not mesh.cp.registry.instances["hello-v1-1"].healthy
        assert "hello-v1-1" not in [i.name for i in mesh.cp.registry.view().instances]
        assert "sidecar exited with code" in out.getvalue()
        # an app that exits leaves the registry and its sidecar drains
        hello2 = mesh.replica("hello-v1-2")
        assert hello2.app is not None and hello2.app.proc is not None
        hello2.app.proc.terminate()
        await eventually(
            lambda: hello2.state == "exited" and not hello2.sidecar.running,  # type: ignore[union-attr]
            timeout=15,
            what="hello-v1-2 exited and its sidecar drained",
        )
        assert "hello-v1-2" not in mesh.cp.registry.instances
        assert hello2.sidecar is not None and not hello2.sidecar.running
    finally:
        pids = mesh.pids()
        print(out.getvalue())
        await asyncio.wait_for(mesh.stop(), 30)
    assert len(pids) == 7
    assert [p for p in pids if pid_alive(p)] == []
    assert not token_file.exists()  # the token files go away with the mesh
    text = out.getvalue()
    assert "[front-v1-1 sidecar] draining" in text  # SIGTERM, not SIGKILL, on stop


def test_bad_mesh_file_says_where() -> None:
    from diktyo.platform.mesh import MeshFileError

    with pytest.raises(MeshFileError) as info:
        load_mesh_text("services:\n  - name: x\n    ports: []\nworkloads: []\n", "m.yaml")
    assert "m.yaml:3:5: error: services[0].ports:" in str(info.value)


@pytest.mark.slow
async def test_an_app_that_dies_at_start_is_reported_and_everything_stops() -> None:
    from diktyo.platform.supervisor import MeshStartError

    text = """
services:
  - name: bad
    ports: [{name: http, port: 9080}]
workloads:
  - name: bad-v1
    labels: {app: bad}
    command: ["{python}", "-c", "print('boom'); raise SystemExit(3)"]
"""
    spec = load_mesh_text(text, "bad.yaml", base_dir=str(HELPERS))
    out = io.StringIO()
    mesh = LocalMesh(
        spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=out, ready_timeout=10
    )
    with pytest.raises(
        MeshStartError, match="bad-v1-1: the app did not listen on its port .* exited with code 3"
    ):
        await asyncio.wait_for(mesh.start(), 30)
    pids = mesh.pids()
    await mesh.stop()
    assert "[bad-v1-1] boom" in out.getvalue()
    assert len(pids) == 2 and [p for p in pids if pid_alive(p)] == []


@pytest.mark.slow
async def test_a_port_taken_after_it_was_picked_is_replaced() -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]

    class Unlucky(LocalMesh):
        handed = False

        def _alloc(self) -> int:
            if not Unlucky.handed and len(self._taken) == 1:  # hand out the busy port once
                Unlucky.handed = True
                self._taken.add(busy_port)
                return busy_port
            return super()._alloc()

    text = f"""
services:
  - name: hello
    ports: [{{name: http, port: 9080}}]
workloads:
  - name: hello-v1
    labels: {{app: hello}}
    command: ["{{python}}", "{TINY_APP}"]
"""
    spec = load_mesh_text(text, "m.yaml", base_dir=str(HELPERS))
    out = io.StringIO()
    mesh = Unlucky(
        spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=out, ready_timeout=20
    )
    try:
        await asyncio.wait_for(mesh.start(), 30)
        assert Unlucky.handed
        rep = mesh.replica("hello-v1-1")
        assert busy_port not in (
            rep.proxy.outbound_port,
            *(i.listen_port for i in rep.proxy.inbound),
        )
        assert "picking new listener ports" in out.getvalue()
        assert mesh.cp.status[rep.node_id].state == "SYNCED"
    finally:
        await mesh.stop()
        busy.close()


@pytest.mark.slow
async def test_adopting_registers_running_replicas_before_the_control_plane_listens(
    tmp_path: Path,
) -> None:
    """A supervisor that adopts a mesh knows the endpoints of its running apps before its
    control plane listens: the sidecars reconnect at once, and a first snapshot without them
    answered their callers 503 UH (the CI failure of stop 18)."""
    spec = load_mesh_text(MESH, "tiny.yaml", base_dir=str(HELPERS))
    first = LocalMesh(
        spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=io.StringIO(),
        ready_timeout=20, home=tmp_path,
    )  # fmt: skip
    second: LocalMesh | None = None
    try:
        await asyncio.wait_for(first.start(), 40)
        state = first.describe()
        for rep in first.replicas:  # the first supervisor dies: nothing watches its children
            for task in (rep.watch, rep.sidecar_watch):
                if task is not None:
                    task.cancel()
        await first.cp.stop()
        second = LocalMesh(
            spec, translator=tiny_translate, sidecar_argv=fake_sidecar, out=io.StringIO(),
            ready_timeout=20, home=tmp_path,
        )  # fmt: skip
        known_at_listen: list[list[str]] = []
        listen = second.cp.start

        async def start(host: str = "127.0.0.1", port: int = 0) -> str:
            known_at_listen.append(sorted(second.cp.registry.instances))
            return await listen(host, port)

        second.cp.start = start  # type: ignore[method-assign]  # observe the moment it listens
        await asyncio.wait_for(second.adopt(state), 40)
        assert known_at_listen == [["front-v1-1", "hello-v1-1", "hello-v1-2"]]
        assert second.state == "ready"
    finally:
        if second is not None:
            await second.stop()
        await first.stop()

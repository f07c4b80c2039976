"""The registry and config HTTP API, as a control plane started with 'diktyo control-plane' is used."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest

from diktyo.control.model import ProxyNode, Service, ServicePort, WorkloadInstance
from diktyo.control.server import ControlPlane
from diktyo.snapshot.model import Node
from diktyo.testing import eventually
from diktyo.testing.controlplane import JSON, YAML, admin_session

SVC = Service(
    hostname="hello.default.svc.cluster.local", short_name="hello", ports=(ServicePort(9080),)
)


async def test_register_over_http_and_poll(translate) -> None:
    cp = ControlPlane(translator=translate, poll_timeout=1.0, observability=False)
    await cp.start()
    try:
        async with admin_session(cp) as s:

            async def post(path: str, obj: object) -> int:
                async with s.post(cp.url + path, data=msgspec.json.encode(obj), headers=JSON) as r:
                    return r.status

            proxy = ProxyNode(node=Node(id="c-1.default", workload="c"), outbound_port=15001)
            assert await post("/v1/registry/proxies", proxy) == 200
            assert await post("/v1/registry/services", SVC) == 200
            inst = msgspec.to_builtins(
                WorkloadInstance(
                    name="h-1",
                    workload="h",
                    address="127.0.0.1",
                    ports={9080: 7001},
                    services=(SVC.hostname,),
                )
            )
            assert (
                await post("/v1/registry/instances", {**inst, "admin_url": "http://127.0.0.1:1"})
                == 200
            )
            assert await post("/v1/registry/proxies", {"node": {"id": 3}}) == 400
            params = {"node": "c-1.default", "version": ""}
            ports: list[int] = []

            async def pushed() -> str | None:
                """The debounced push has the instance: the version that carries it."""
                async with s.get(cp.url + "/v1/snapshot", params=params) as r:
                    assert r.status == 200
                    snap = json.loads(await r.read())
                ports[:] = [e["port"] for c in snap.get("clusters", []) for e in c.get("endpoints", [])]
                return r.headers["x-diktyo-version"] if ports else None

            version = await eventually(pushed, what=lambda: f"h-1's endpoint pushed: {ports}")
            assert ports == [7001]
            async with s.get(cp.url + "/v1/registry") as r:
                reg = await r.json()
            assert [i["name"] for i in reg["instances"]] == ["h-1"]
            async with s.delete(cp.url + "/v1/registry/instances/h-1") as r:
                assert r.status == 200
            params["version"] = version
            async with s.get(cp.url + "/v1/snapshot", params=params) as r:
                assert r.status == 200  # the long poll answers with the new version
                snap = json.loads(await r.read())
            assert [e for c in snap["clusters"] for e in c.get("endpoints", [])] == []
            async with s.post(cp.url + "/v1/ack", json={"node": "c-1.default"}) as r:
                assert r.status == 400
            async with s.get(cp.url + "/v1/proxies") as r:
                listing = await r.json()
            assert listing["proxies"][0]["node"] == "c-1.default"
            async with s.delete(cp.url + "/v1/registry/proxies/c-1.default") as r:
                assert r.status == 200
            async with s.get(cp.url + "/v1/snapshot", params=params) as r:
                assert r.status == 404
    finally:
        await cp.stop()


@pytest.mark.timeout(30)
def test_control_plane_command_serves_and_stops(tmp_path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "control-plane",
            "--port",
            "0",
            "--config",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("control plane serving on http://127.0.0.1:"), line
        url = line.split()[4].rstrip(",")
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url + "/healthz", timeout=5) as r:
            assert json.loads(r.read())["ok"] is True
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_apply_reports_analysis_of_the_applied_file() -> None:
    """Analysis errors reject an apply (issue 12, item 14); warnings pass and are reported."""
    vs = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: hello}\n"
        "spec:\n  hosts: [hello]\n  http:\n  - route:\n    - destination: {host: hello, subset: v9}\n"
    )
    cp = ControlPlane(observability=False)
    await cp.start()
    try:
        cp.registry.add_service(SVC)
        async with (
            admin_session(cp) as s,
            s.post(cp.url + "/v1/config?source=vs.yaml", data=vs, headers=YAML) as r,
        ):
            body = await r.json()
        assert r.status == 400 and body["applied"] == []
        assert any(
            m.startswith("Error [IST0101] (VirtualService default/hello vs.yaml:8:")
            and "'v9'" in m
            for m in body["errors"]
        ), body
        assert cp.store.resources == ()
        warn = vs.replace("{host: hello, subset: v9}", "{host: nowhere}")
        async with (
            admin_session(cp) as s,
            s.post(cp.url + "/v1/config?source=vs.yaml", data=warn, headers=YAML) as r,
        ):
            body = await r.json()
        assert r.status == 200 and body["applied"] == [["VirtualService", "default", "hello"]]
        assert any(
            m.startswith("Error [IST0101] (VirtualService default/hello vs.yaml:8:")
            and 'Referenced host not found: "nowhere"' in m
            for m in body["messages"]
        ), body
    finally:
        await cp.stop()

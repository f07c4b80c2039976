"""Faults that must not lose anything: 3 control-plane replicas on a real 3-member etcd cluster.

Everything runs on 127.0.0.1: etcd members, replica processes (`diktyo control-plane --store
etcd://...`), real sidecar processes failing over between replicas, a real upstream, and a
bounded steady load (one request at a time, ~50/s) through a sidecar.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from diktyo.control.model import ProxyNode, Service, ServicePort, WorkloadInstance
from diktyo.security.identity import fetch_certificate
from diktyo.snapshot.model import Node
from diktyo.testing import FakeUpstream, Response, free_port, http_request
from diktyo.testing.etcd import EtcdCluster, etcd_available
from diktyo.testing.wait import eventually

pytestmark = [
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
    pytest.mark.timeout(240),
]

ADMIN = "e2e-admin-token"
SVC = Service(
    hostname="reviews.default.svc.cluster.local", short_name="reviews", ports=(ServicePort(9080),)
)
CLI = "import sys; from diktyo.cli.main import main; sys.exit(main())"


def vs(name: str, timeout: str = "7s") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  http:
  - timeout: {timeout}
    route:
    - destination: {{host: {name}}}
"""


@dataclass
class Mesh:
    tmp: Path
    etcd: EtcdCluster
    env: dict[str, str]
    replicas: dict[str, tuple[asyncio.subprocess.Process, str]] = field(default_factory=dict)
    sidecars: list[tuple[asyncio.subprocess.Process, dict[str, Any]]] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.replicas.values()]

    async def start_replica(self, rid: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, "control-plane", "--port", "0",
            "--store", self.etcd.store_url, "--store-key-file", str(self.tmp / "store.key"),
            "--replica-id", rid,
            env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=_log(self.tmp / f"{rid}.log"),
        )  # fmt: skip
        assert proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, f"replica {rid} exited: {(self.tmp / f'{rid}.log').read_text()[-2000:]}"
            if line.startswith("control plane serving on "):
                url = line.split()[4].rstrip(",")
                break
        self.replicas[rid] = (proc, url)
        return url

    def kill_replica(self, rid: str) -> None:
        proc, _ = self.replicas.pop(rid)
        proc.send_signal(signal.SIGKILL)

    async def call(self, url: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN}", **kw.pop("headers", {})}
        if "data" in kw and "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, url + path, headers=headers, **kw) as r,
        ):
            return r.status, await r.json(content_type=None)

    async def apply(self, url: str, text: str) -> tuple[int, Any]:
        return await self.call(
            url, "POST", "/v1/config", data=text, headers={"Content-Type": "application/yaml"}
        )

    async def start_sidecar(self, node: str, urls: list[str]) -> dict[str, Any]:
        status, body = await self.call(
            urls[0], "POST", "/v1/tokens", json={"namespace": "default", "service_account": node}
        )
        assert status == 200, body
        token_file = self.tmp / f"{node}.token"
        token_file.write_text(body["token"])
        os.chmod(token_file, 0o600)
        outbound = free_port()
        proxy = ProxyNode(
            node=Node(id=f"{node}.default", workload=node, service_account=node),
            outbound_port=outbound,
        )
        status, body = await self.call(
            urls[0], "POST", "/v1/registry/proxies", data=msgspec.json.encode(proxy)
        )
        assert status == 200, body
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "diktyo.proxy", "--control-plane", ",".join(urls),
            "--node", f"{node}.default", "--token-file", str(token_file),
            "--outbound-port", str(outbound),
            env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=_log(self.tmp / f"{node}.log"),
        )  # fmt: skip
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        self.sidecars.append((proc, ready))
        return dict(ready)

    async def connected_to(self, url: str, node: str) -> str:
        _, body = await self.call(url, "GET", "/v1/proxies")
        return next((p["replica"] for p in body["proxies"] if p["node"] == node), "")

    async def close(self) -> None:
        for proc, _ in self.sidecars:
            if proc.returncode is None:
                proc.terminate()
        for proc, _ in self.replicas.values():
            if proc.returncode is None:
                proc.terminate()
        for proc, _ in [*self.sidecars, *self.replicas.values()]:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
        self.etcd.close()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    (tmp_path / "etcd").mkdir()
    etcd = EtcdCluster(tmp_path / "etcd", members=3)
    etcd.start()
    home = tmp_path / "home"
    home.mkdir()
    (home / "admin-token").write_text(ADMIN)
    os.chmod(home / "admin-token", 0o600)
    env = {**os.environ, "DIKTYO_HOME": str(home)}
    m = Mesh(tmp_path, etcd, env)
    try:
        yield m
    finally:
        await m.close()


class Load:
    """One request at a time through ``port`` (~50/s) until stopped; counts failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = await http_request(self.port, "GET", "http://reviews:9080/", timeout=5)
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"HTTP {r.status}")
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.failed.append(repr(exc))
            await asyncio.sleep(0.02)  # real time: the load generator's pause

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def _serve_reviews(mesh: Mesh, app_port: int) -> None:
    url = mesh.urls[0]
    status, _ = await mesh.call(url, "POST", "/v1/registry/services", data=msgspec.json.encode(SVC))
    assert status == 200
    inst = WorkloadInstance(
        name="reviews-1", workload="reviews", address="127.0.0.1", ports={9080: app_port},
        services=(SVC.hostname,),
    )  # fmt: skip
    status, _ = await mesh.call(
        url, "POST", "/v1/registry/instances", data=msgspec.json.encode(inst)
    )
    assert status == 200


async def test_replica_killed_under_load_loses_nothing(mesh: Mesh) -> None:
    for rid in ("r0", "r1", "r2"):
        await mesh.start_replica(rid)
    r0, r1, r2 = mesh.urls
    async with FakeUpstream(Response(body=b"reviews")) as app:
        await _serve_reviews(mesh, app.port)
        a = await mesh.start_sidecar("a", [r0, r1, r2])
        b = await mesh.start_sidecar("b", [r1, r2, r0])
        port = a["listeners"]["outbound"]
        await eventually(
            lambda: _get_ok(port), timeout=15, what="requests through sidecar a succeed"
        )
        assert await eventually(lambda: mesh.connected_to(r1, "a.default"), timeout=10) == "r0"
        # identity before: a token and a certificate from r0's CA
        _, tok = await mesh.call(
            r0, "POST", "/v1/tokens", json={"namespace": "default", "service_account": "id"}
        )
        spiffe = "spiffe://cluster.local/ns/default/sa/id"
        before = await fetch_certificate(r0, spiffe, token=tok["token"])

        load = Load(port)
        load.start()
        await asyncio.sleep(1.0)  # real time: load runs before the fault
        mesh.kill_replica("r0")  # kill -9
        # a's sidecar moves to another replica within a few seconds
        await eventually(lambda: _moved(mesh, r1, "a.default"), timeout=5, what="a moved off r0")

        # proxy-status (CLI) names the replica each sidecar talks to, and the leader (r0's
        # records go when its lease expires)
        async def proxy_status() -> str:
            ps = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLI, "proxy-status", "--control-plane", r2,
                env=mesh.env, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out = (await ps.communicate())[0].decode()
            ok = out.startswith("store: etcd, replicas: r1") and "(leader)" in out
            return out if ps.returncode == 0 and ok else ""

        out = await eventually(proxy_status, timeout=15, what="proxy-status all SYNCED, r0 gone")
        row_a = next(line for line in out.splitlines() if line.startswith("a.default"))
        row_b = next(line for line in out.splitlines() if line.startswith("b.default"))
        assert " r1 " in row_a or " r2 " in row_a, out
        assert " r1 " in row_b and "SYNCED" in row_b, out
        # the dashboard's config API shows replicas and leader
        _, cfg = await mesh.call(r1, "GET", "/api/config")
        cp = cfg["control_plane"]
        assert cp["backend"] == "etcd" and cp["replica"] == "r1"
        assert {r["id"] for r in cp["replicas"]} == {"r1", "r2"}
        assert cp["leader"] in ("r1", "r2")
        # 100 applies at once through the two live replicas: all stored
        texts = [vs(f"svc-{i}", f"{i % 9 + 1}s") for i in range(100)]
        results = await asyncio.gather(
            *(mesh.apply((r1, r2)[i % 2], t) for i, t in enumerate(texts))
        )
        assert [s for s, _ in results] == [200] * 100, [b for s, b in results if s != 200]
        await asyncio.sleep(1.0)  # real time: load keeps running after the applies
        await eventually(lambda: load.ok > 50, timeout=30, what=lambda: f"51 answers: {load.ok}")
        await load.stop()
        assert load.failed == [], load.failed[:5]
        assert load.ok > 50

        for url in (r1, r2):
            _, cfg = await mesh.call(url, "GET", "/v1/config")
            names = {r[2] for r in cfg["resources"]}
            assert {f"svc-{i}" for i in range(100)} <= names

        # every sidecar ends on the same routes (whichever replica serves it)
        async def routes() -> list[Any]:
            out = []
            for _, ready in mesh.sidecars:
                dump = await _config_dump(ready)
                out.append(sorted(
                    (vh["name"], [r.get("timeout") for r in vh.get("routes", [])])
                    for t in dump.get("route_tables", []) for vh in t.get("virtual_hosts", [])
                    if vh["name"].startswith("svc-")
                ))  # fmt: skip
            return out if len(out[0]) == 100 and all(o == out[0] for o in out) else []

        await eventually(routes, timeout=20, what="both sidecars on the same 100 routes")

        # every replica restarts: identities stay valid (the CA root comes from the store)
        for rid in list(mesh.replicas):
            mesh.kill_replica(rid)
        r3 = await mesh.start_replica("r3")
        after = await fetch_certificate(r3, spiffe, token=tok["token"])  # old token still good
        assert after.trust_bundle_pem == before.trust_bundle_pem
        assert await _get_ok(port)  # the data plane never depended on the replicas
        assert b is not None


async def test_etcd_members_stopping(mesh: Mesh) -> None:
    for rid in ("r0", "r1"):
        await mesh.start_replica(rid)
    r0, r1 = mesh.urls
    async with FakeUpstream(Response(body=b"reviews")) as app:
        await _serve_reviews(mesh, app.port)
        a = await mesh.start_sidecar("a", [r0, r1])
        port = a["listeners"]["outbound"]
        await eventually(lambda: _get_ok(port), timeout=15, what="requests through a succeed")
        load = Load(port)
        load.start()
        mesh.etcd.stop_member(2)  # one member down: nothing changes for users
        status, body = await mesh.apply(r0, vs("one-down"))
        assert status == 200, body
        mesh.etcd.stop_member(1)  # quorum lost
        status, body = await mesh.apply(r1, vs("no-quorum"))
        assert status == 503
        assert "config not stored: etcd has no quorum, nothing was written" in body["error"]
        assert "majority of the etcd members" in body["error"]
        # as a user sees it: 'diktyo apply' exits 1 and names the cause
        (mesh.tmp / "nq.yaml").write_text(vs("no-quorum"))
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, "apply", "-f", str(mesh.tmp / "nq.yaml"),
            "--control-plane", r0, env=mesh.env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        err = (await cli.communicate())[1].decode()
        assert cli.returncode == 1 and "etcd has no quorum" in err, err
        # a registration during the outage is queued on r0 and lands when quorum returns
        late = WorkloadInstance(
            name="late-1", workload="late", address="127.0.0.1", ports={9080: 1}, services=()
        )
        status, _ = await mesh.call(
            r0, "POST", "/v1/registry/instances", data=msgspec.json.encode(late)
        )
        assert status == 200

        # proxy-status tells the operator why
        async def says_unreachable() -> str:
            ps = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLI, "proxy-status", "--control-plane", r1,
                env=mesh.env, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out = (await ps.communicate())[0].decode()
            return out if "(etcd unreachable: no quorum?)" in out.splitlines()[0] else ""

        await eventually(says_unreachable, timeout=15)
        await asyncio.sleep(1.0)  # real time: sidecars keep serving the last good snapshot
        mesh.etcd.start_member(1, wait=False)
        mesh.etcd.start_member(2, wait=False)
        mesh.etcd.wait_healthy(30)

        async def applied() -> bool:
            status, _ = await mesh.apply(r1, vs("after"))
            return status == 200

        await eventually(applied, timeout=20, what="apply works again after quorum returns")
        await load.stop()
        assert load.failed == [], load.failed[:5]
        seen: dict[str, set[str]] = {}
        for url in (r0, r1):

            async def has_all(url: str = url) -> bool:
                _, cfg = await mesh.call(url, "GET", "/v1/config")
                seen[url] = {r[2] for r in cfg["resources"]}
                _, reg = await mesh.call(url, "GET", "/v1/registry")
                late = any(i["name"] == "late-1" for i in reg["instances"])
                return late and {"one-down", "after"} <= seen[url] and "no-quorum" not in seen[url]

            await eventually(has_all, timeout=10, what=lambda url=url: f"{url}: {seen.get(url)}")


def _log(path: Path) -> Any:
    return open(path, "ab")


async def _get_ok(port: int) -> bool:
    try:
        r = await http_request(port, "GET", "http://reviews:9080/", timeout=3)
    except Exception:  # noqa: BLE001
        return False
    return r.status == 200


async def _moved(mesh: Mesh, url: str, node: str) -> bool:
    try:
        return await mesh.connected_to(url, node) not in ("", "r0")
    except aiohttp.ClientError:
        return False


async def _config_dump(ready: dict[str, Any]) -> dict[str, Any]:
    admin = ready["admin"] if isinstance(ready.get("admin"), int) else ready["listeners"]["admin"]
    headers = {}
    if ready.get("admin_token"):
        headers["Authorization"] = f"Bearer {ready['admin_token']}"
    url = f"http://127.0.0.1:{admin}/config_dump"
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return dict(await r.json(content_type=None))

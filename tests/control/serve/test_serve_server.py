"""Control plane push over real HTTP: N clients, ACK/NACK, debounce, rejected config, reconnect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from diktyo.control.model import Service, ServicePort, WorkloadInstance
from diktyo.control.server import ControlPlane
from diktyo.control.store import ConfigStore, LoadOutcome
from diktyo.core.clock import ManualClock
from diktyo.proxy.config_client import Backoff, ConfigClient
from diktyo.snapshot.model import Snapshot
from diktyo.testing import eventually, free_port
from diktyo.testing.controlplane import YAML, admin_session

SVC = Service(
    hostname="reviews.default.svc.cluster.local", short_name="reviews", ports=(ServicePort(9080),)
)


def _inst(name: str, port: int) -> WorkloadInstance:
    return WorkloadInstance(
        name=name,
        workload="reviews-v1",
        address="127.0.0.1",
        ports={9080: port},
        services=(SVC.hostname,),
    )


async def _until(pred, timeout: float = 10.0) -> None:
    await eventually(pred, timeout=timeout, interval=0.02)


def _endpoints(snap: Snapshot | None) -> list[int]:
    assert snap is not None
    return sorted(e.port for c in snap.clusters for e in c.endpoints)


@pytest.fixture
async def cp(translate):
    plane = ControlPlane(translator=translate, poll_timeout=2.0, merge_service_entries=False)
    await plane.start()
    yield plane
    await plane.stop()


async def test_push_to_many_clients_and_ack(cp: ControlPlane, make_proxy) -> None:
    n = 20
    for i in range(n):
        cp.add_proxy(make_proxy(i))
    got: dict[int, list[Snapshot]] = {i: [] for i in range(n)}
    clients = [
        ConfigClient(
            cp.url, f"app-{i}.default", got[i].append, token=cp.sidecar_token(make_proxy(i))
        )
        for i in range(n)
    ]
    for c in clients:
        c.start()
    try:
        await _until(lambda: all(c.snapshot is not None for c in clients))
        cp.registry.add_service(SVC)
        cp.registry.add_instance(_inst("r1", 7001))
        await _until(lambda: all(_endpoints(c.snapshot) == [7001] for c in clients))
        await _until(lambda: all(s.state == "SYNCED" for s in cp.status.values()))
        assert len({c.version.split("-")[0] for c in clients}) == 1  # one push version for all
        async with admin_session(cp) as s, s.get(cp.url + "/v1/proxies") as r:
            body = await r.json()
        assert [p["state"] for p in body["proxies"]] == ["SYNCED"] * n
        # each proxy got: the initial snapshot, then the one with the endpoint (debounced)
        assert all(len(v) == 2 for v in got.values()), {i: len(v) for i, v in got.items()}
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_nack_keeps_last_good_and_reports_reason(cp: ControlPlane, make_proxy) -> None:
    cp.add_proxy(make_proxy(1))
    cp.registry.add_service(SVC)

    def on_snapshot(snap: Snapshot) -> None:
        if _endpoints(snap) == [7002]:
            raise ValueError("port 7002 is cursed")

    client = ConfigClient(
        cp.url, "app-1.default", on_snapshot, token=cp.sidecar_token(make_proxy(1))
    )
    client.start()
    try:
        await client.wait_ready(5)
        good = client.snapshot
        cp.registry.add_instance(_inst("r2", 7002))
        await _until(lambda: cp.status["app-1.default"].state == "NACK")
        assert "cursed" in cp.status["app-1.default"].error
        assert client.snapshot is good and client.stats["nacked"] == 1
        cp.registry.add_instance(_inst("r3", 7003))
        await _until(lambda: cp.status["app-1.default"].state == "SYNCED")
        assert _endpoints(client.snapshot) == [7002, 7003]
    finally:
        await client.close()


async def test_debounce_merges_a_burst_into_one_push(translate, make_proxy) -> None:
    """The real push loop on virtual time (``clock=ManualClock()``): however busy the machine,
    no time passes for the debouncer unless the test advances it, so the burst cannot be split
    and the push happens exactly when the quiet period has passed."""
    clock = ManualClock()
    cp = ControlPlane(
        translator=translate, poll_timeout=2.0, merge_service_entries=False, clock=clock,
        debounce=0.05,
    )  # fmt: skip
    await cp.start()
    try:
        cp.add_proxy(make_proxy(1))
        cp.registry.add_service(SVC)
        clock.advance(0.05)  # the registration's own push falls due
        await eventually(lambda: not cp.debouncer.pending, timeout=5, what="first push fired")
        before = cp.pushes
        for i in range(30):
            cp.registry.add_instance(_inst(f"r{i}", 7000 + i))
            clock.advance(0.01)
            await asyncio.sleep(0)  # real time: the push loop sees each change
        clock.advance(0.03)  # 0.04 s after the last change: still inside the quiet period
        await asyncio.sleep(0.2)  # real time: the loop re-checks the clock every <= 0.05 s meanwhile
        assert cp.debouncer.pending and cp.pushes == before  # still quiet-waiting
        clock.advance(0.01)  # quiet period over
        await eventually(lambda: cp.pushes > before, timeout=5, what="the burst's push")

        def thirty() -> bool:
            entry = cp.cache.get("app-1.default")
            return entry is not None and len(_endpoints(entry.snapshot)) == 30

        await eventually(thirty, timeout=5, what="one snapshot with all 30 endpoints")
        assert cp.pushes == before + 1  # one push for the whole burst
        assert cp.debouncer.fire() == 0  # and nothing left pending
    finally:
        await cp.stop()


async def test_unknown_node_404_with_help(cp: ControlPlane) -> None:
    params = {"node": "nope", "version": ""}
    async with admin_session(cp) as s, s.get(cp.url + "/v1/snapshot", params=params) as r:
        assert r.status == 404
        assert "register it first" in (await r.json())["error"]


async def test_long_poll_answers_204_when_nothing_changes(cp: ControlPlane, make_proxy) -> None:
    cp.poll_timeout = 0.3
    cp.add_proxy(make_proxy(1))
    async with admin_session(cp) as s:
        async with s.get(
            cp.url + "/v1/snapshot", params={"node": "app-1.default", "version": ""}
        ) as r:
            assert r.status == 200
            version = r.headers["x-diktyo-version"]
        async with s.get(
            cp.url + "/v1/snapshot", params={"node": "app-1.default", "version": version}
        ) as r:
            assert r.status == 204


@dataclass(frozen=True)
class _Res:
    name: str
    kind: str = "VirtualService"

    def __str__(self) -> str:
        return self.name


def _fake_loader(text: str, source: str) -> LoadOutcome:
    """Each non-empty line is a resource name; a line starting with '!' is a load error."""
    res, errs = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("!"):
            errs.append(f"{source}:{n}:1: error: {line[1:]}")
        elif line.strip():
            res.append(_Res(line.strip()))
    return LoadOutcome(tuple(res), tuple(errs))


async def test_rejected_config_keeps_last_good(translate, make_proxy, tmp_path) -> None:
    def load_paths(paths):
        out = [_fake_loader(p.read_text(), str(p)) for p in paths]
        return LoadOutcome(
            tuple(r for o in out for r in o.resources), tuple(e for o in out for e in o.errors)
        )

    (tmp_path / "a.yaml").write_text("vs-a\n")
    store = ConfigStore(tmp_path, load_paths=load_paths, load_text=_fake_loader)
    cp = ControlPlane(
        translator=translate, store=store, poll_timeout=2.0, merge_service_entries=False
    )
    await cp.start()
    client = ConfigClient(
        cp.url, "app-1.default", lambda s: None, token=cp.sidecar_token(make_proxy(1))
    )
    try:
        cp.add_proxy(make_proxy(1))
        client.start()
        await client.wait_ready(5)

        def hosts() -> list[str]:
            assert client.snapshot is not None
            return [vh.name for vh in client.snapshot.route_tables[0].virtual_hosts]

        assert hosts() == ["vs-a"]
        async with admin_session(cp) as s:
            async with s.post(
                cp.url + "/v1/config",
                data="vs-b\n!bad field",
                params={"source": "b.yaml"},
                headers=YAML,
            ) as r:
                assert r.status == 400
                assert (await r.json())["errors"] == ["b.yaml:2:1: error: bad field"]
            async with s.post(cp.url + "/v1/config", data="vs-c\n", headers=YAML) as r:
                assert r.status == 200
            await _until(lambda: hosts() == ["vs-a", "vs-c"])
            async with s.delete(cp.url + "/v1/config", data="vs-c\n", headers=YAML) as r:
                assert r.status == 200
            await _until(lambda: hosts() == ["vs-a"])
        # a broken file is rejected, the last good config keeps serving
        (tmp_path / "b.yaml").write_text("vs-b\n!oops\n")
        await _until(lambda: bool(store.errors))
        assert store.errors == (f"{tmp_path / 'b.yaml'}:2:1: error: oops",)
        assert hosts() == ["vs-a"]
        (tmp_path / "b.yaml").write_text("vs-b\n")
        await _until(lambda: hosts() == ["vs-a", "vs-b"])
        assert store.errors == ()
    finally:
        await client.close()
        await cp.stop()


async def test_client_survives_control_plane_restart(translate, make_proxy) -> None:
    port = free_port()
    cp = ControlPlane(translator=translate, poll_timeout=2.0, merge_service_entries=False)
    await cp.start(port=port)
    cp.add_proxy(make_proxy(1))
    cp.registry.add_service(SVC)
    cp.registry.add_instance(_inst("r1", 7001))
    # the admin credential: a restarted control plane keeps it ($DIKTYO_HOME/admin-token)
    client = ConfigClient(
        cp.url, "app-1.default", lambda s: None, backoff_cap=0.3, token=cp.admin_token
    )
    client.start()
    try:
        await _until(lambda: client.snapshot is not None and _endpoints(client.snapshot) == [7001])
        await cp.stop()
        await _until(lambda: not client.connected, timeout=5)
        await asyncio.sleep(0.5)  # real time: several failed reconnects
        assert _endpoints(client.snapshot) == [7001]  # keeps the last good snapshot
        cp2 = ControlPlane(
            translator=translate,
            poll_timeout=2.0,
            merge_service_entries=False,
            admin_token=cp.admin_token,
        )
        await cp2.start(port=port)
        try:
            cp2.add_proxy(make_proxy(1))
            cp2.registry.add_service(SVC)
            cp2.registry.add_instance(_inst("r9", 7009))
            await _until(
                lambda: client.snapshot is not None and _endpoints(client.snapshot) == [7009]
            )
            await _until(lambda: cp2.status["app-1.default"].state == "SYNCED")
            assert client.stats["reconnects"] >= 1
        finally:
            await cp2.stop()
    finally:
        await client.close()


async def test_unhealthy_instance_leaves_endpoints(cp: ControlPlane, make_proxy) -> None:
    from aiohttp import web

    ready = {"ok": True}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=200 if ready["ok"] else 503)

    app = web.Application()
    app.router.add_get("/ready", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    admin = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    cp.health_interval = 0.1
    cp.add_proxy(make_proxy(1))
    cp.registry.add_service(SVC)
    cp.registry.add_instance(_inst("r1", 7001), admin_url=admin)
    cp.registry.add_instance(_inst("r2", 7002))
    client = ConfigClient(
        cp.url, "app-1.default", lambda s: None, token=cp.sidecar_token(make_proxy(1))
    )
    client.start()
    try:
        await _until(
            lambda: client.snapshot is not None and _endpoints(client.snapshot) == [7001, 7002]
        )
        ready["ok"] = False
        await _until(lambda: _endpoints(client.snapshot) == [7002])
        ready["ok"] = True
        await _until(lambda: _endpoints(client.snapshot) == [7001, 7002])
    finally:
        await client.close()
        await runner.cleanup()


def test_backoff_is_jittered_and_capped() -> None:
    import random

    b = Backoff(0.1, 5.0, random.Random(1))
    waits = [b.next() for _ in range(12)]
    assert all(0.05 <= w <= 5.0 for w in waits)
    assert max(waits[8:]) > 1.0  # grows
    assert len(set(waits)) == len(waits)  # jittered


async def test_restarted_control_plane_does_not_repush_same_content(translate, make_proxy) -> None:
    port = free_port()

    async def plane() -> ControlPlane:
        cp = ControlPlane(
            translator=translate, poll_timeout=1.0, observability=False, admin_token="restart-admin"
        )
        await cp.start(port=port)
        cp.registry.add_service(SVC)
        cp.registry.add_instance(_inst("r1", 7001))
        cp.add_proxy(make_proxy(1))
        return cp

    cp = await plane()
    # the admin credential: a restarted control plane keeps it ($DIKTYO_HOME/admin-token)
    client = ConfigClient(
        cp.url, "app-1.default", lambda s: None, backoff_cap=0.3, token=cp.admin_token
    )
    client.start()
    try:
        await _until(lambda: client.snapshot is not None and _endpoints(client.snapshot) == [7001])
        await _until(lambda: cp.status["app-1.default"].state == "SYNCED")
        received = client.stats["received"]
        await cp.stop()
        await _until(lambda: not client.connected)
        cp = await plane()
        await _until(lambda: cp.status["app-1.default"].state == "SYNCED")
        await asyncio.sleep(0.3)  # real time: an idle period in which nothing may be pushed
        assert client.stats["received"] == received  # adopted, not pushed again
    finally:
        await client.close()
        await cp.stop()

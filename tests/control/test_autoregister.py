"""Auto-registration against a real control plane: a registrant with a group's identity creates
its WorkloadEntry as Istio names and builds it, reports health, and its entry goes away a grace
period after it disconnects (unless it comes back)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from diktyo.control.autoregister import (
    CONNECTED_AT,
    DISCONNECTED_AT,
    entry_name,
    parse_duration,
)
from diktyo.control.model import ProxyNode
from diktyo.control.server import ControlPlane
from diktyo.platform.registration import RegistrationRefused, WorkloadRegistration
from diktyo.snapshot.model import Node
from diktyo.testing import eventually

GROUP = """
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings, namespace: shop}
spec:
  metadata:
    labels: {app: ratings, version: v3}
    annotations: {team: data}
  template:
    ports: {http: 9080}
    labels: {app: template-label, tier: backend}
    serviceAccount: ratings-sa
  probe:
    periodSeconds: 1
    httpGet: {port: 9080, path: /healthz}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http}]
  workloadSelector: {labels: {app: ratings}}
"""

CLIENT = ProxyNode(node=Node(id="client.shop", workload="client", namespace="shop"))
HOST = "ratings.shop.svc.cluster.local"


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(observability=False, debounce=0.01)
    plane.autoregister.grace_period = 0.6
    await plane.start()
    keys, errors = plane.store.apply_text(GROUP, "group.yaml")
    assert keys and not errors
    plane.add_proxy(CLIENT)
    try:
        yield plane
    finally:
        await plane.stop()


def entry(cp: ControlPlane, name: str) -> object | None:
    return cp.autoregister.store.get("WorkloadEntry", "shop", name)


def endpoints(cp: ControlPlane) -> list[tuple[str, int]]:
    cp.push_now()
    snap = cp.cache.get(CLIENT.node.id)
    assert snap is not None
    cluster = next(c for c in snap.snapshot.clusters if c.name == f"outbound|9080||{HOST}")
    return [(e.address, e.port) for e in cluster.endpoints]


async def _run(reg: WorkloadRegistration) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(reg.run())


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def registration(
    cp: ControlPlane, sa: str = "ratings-sa", ns: str = "shop"
) -> WorkloadRegistration:
    token = cp.identity.token_for(ns, sa)
    return WorkloadRegistration([cp.url], token, "shop", "ratings", heartbeat=1.0)


async def test_registers_entry_like_istio_reports_health_and_is_removed_after_grace(
    cp: ControlPlane,
) -> None:
    reg = registration(cp)
    task = await _run(reg)
    try:
        info = await reg.wait_group(5)
        assert info["template"]["serviceAccount"] == "ratings-sa"
        assert info["labels"] == {"app": "ratings", "tier": "backend", "version": "v3"}
        assert info["probe"]["httpGet"] == {"port": 9080, "path": "/healthz"}
        reg.register(
            {"address": "127.0.0.9", "node": "n1", "inbound": {"9080": 15099},
             "labels": {"host": "a"}, "locality": "eu/z1"}
        )  # fmt: skip
        await asyncio.wait_for(reg.registered.wait(), 5)
        name = entry_name("ratings", "127.0.0.9")
        assert reg.name == name == "ratings-127.0.0.9"
        res = entry(cp, name)
        assert res is not None
        spec = res.spec  # type: ignore[attr-defined]
        assert spec.address == "127.0.0.9"
        assert spec.ports == {"http": 15099}  # the sidecar's inbound listener stands in for 9080
        assert spec.service_account == "ratings-sa" and spec.locality == "eu/z1"
        # labels: template < group metadata < registrant
        assert spec.labels == {"app": "ratings", "tier": "backend", "version": "v3", "host": "a"}
        ann = res.annotations  # type: ignore[attr-defined]
        assert ann["istio.io/autoRegistrationGroup"] == "ratings"
        assert ann["proxy.istio.io/health-checks-enabled"] == "true"
        assert ann["team"] == "data" and CONNECTED_AT in ann
        # health checks enabled: no endpoint until the first healthy report
        assert endpoints(cp) == []
        reg.set_health(True)
        await eventually(lambda: endpoints(cp) == [("127.0.0.9", 15099)], timeout=5)
        snap = cp.cache.get(CLIENT.node.id)
        assert snap is not None
        ep = next(c for c in snap.snapshot.clusters if c.name == f"outbound|9080||{HOST}")
        assert ep.endpoints[0].principal == "spiffe://cluster.local/ns/shop/sa/ratings-sa"
        reg.set_health(False, "HTTP probe answered 500")
        await eventually(lambda: endpoints(cp) == [], timeout=5)
        cond = entry(cp, name).status["conditions"][0]  # type: ignore[union-attr]
        assert cond["status"] == "False" and cond["message"] == "HTTP probe answered 500"
        reg.set_health(True)
        await eventually(lambda: endpoints(cp) == [("127.0.0.9", 15099)], timeout=5)
    finally:
        await _stop(task)
    # the registrant went away: disconnected at once, removed after the grace period
    await eventually(
        lambda: DISCONNECTED_AT in getattr(entry(cp, name), "annotations", {}), timeout=5
    )
    assert entry(cp, name) is not None
    await eventually(lambda: entry(cp, name) is None, timeout=5)
    assert endpoints(cp) == []
    assert cp.autoregister.stats.deletes == 1


async def test_a_registrant_back_within_the_grace_period_keeps_its_entry(
    cp: ControlPlane,
) -> None:
    cp.autoregister.grace_period = 3.0
    payload = {"address": "127.0.0.7", "node": "n", "inbound": {"9080": 15001}}
    reg = registration(cp)
    task = await _run(reg)
    reg.register(payload)
    await asyncio.wait_for(reg.registered.wait(), 5)
    reg.set_health(True)
    await eventually(lambda: endpoints(cp) == [("127.0.0.7", 15001)], timeout=5)
    await _stop(task)
    name = "ratings-127.0.0.7"
    await eventually(
        lambda: DISCONNECTED_AT in getattr(entry(cp, name), "annotations", {}), timeout=5
    )
    # back before the grace period ends: the same entry, connected again, health kept
    again = registration(cp)
    task = await _run(again)
    try:
        again.register(payload)
        await asyncio.wait_for(again.registered.wait(), 5)
        res = entry(cp, name)
        assert res is not None and CONNECTED_AT in res.annotations  # type: ignore[attr-defined]
        assert DISCONNECTED_AT not in res.annotations  # type: ignore[attr-defined]
        assert endpoints(cp) == [("127.0.0.7", 15001)]
        await asyncio.sleep(3.5)  # real time: longer than the grace period: still there
        assert entry(cp, name) is not None
    finally:
        await _stop(task)


@pytest.mark.parametrize(
    ("sa", "ns", "message"),
    [
        ("other-sa", "shop", "may not register into namespace shop as service account ratings-sa"),
        ("ratings-sa", "elsewhere", "may not register into namespace shop"),
    ],
)
async def test_a_token_of_another_identity_is_refused(
    cp: ControlPlane, sa: str, ns: str, message: str
) -> None:
    reg = registration(cp, sa=sa, ns=ns)
    task = await _run(reg)
    try:
        with pytest.raises(RegistrationRefused) as exc:
            await reg.wait_group(1.5)
        assert message in str(exc.value)
    finally:
        await _stop(task)
    assert cp.autoregister.store.entries() == []


async def test_an_unknown_group_is_refused_with_a_hint(cp: ControlPlane) -> None:
    token = cp.identity.token_for("shop", "ratings-sa")
    reg = WorkloadRegistration([cp.url], token, "shop", "nope")
    task = await _run(reg)
    try:
        with pytest.raises(RegistrationRefused) as exc:
            await reg.wait_group(1.5)
        assert "cannot find WorkloadGroup shop/nope: apply it first" in str(exc.value)
    finally:
        await _stop(task)


async def test_without_a_token_the_endpoint_answers_401(cp: ControlPlane) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(cp.url + "/v1/registry/workloadentries")
    assert exc.value.status == 401


def test_go_durations() -> None:
    assert parse_duration("10s") == 10.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2") == 2.0
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("10 seconds")


def test_entry_names_follow_istio() -> None:
    assert entry_name("g", "10.0.0.1") == "g-10.0.0.1"
    assert entry_name("g", "fd00::1", "net1") == "g-fd00--1-net1"
    assert len(entry_name("x" * 300, "10.0.0.1")) == 253


async def test_deleting_the_group_deletes_its_entries_and_ends_the_sessions(
    cp: ControlPlane,
) -> None:
    reg = registration(cp)
    task = await _run(reg)
    try:
        reg.register({"address": "127.0.0.8", "node": "n", "inbound": {"9080": 15002}})
        await asyncio.wait_for(reg.registered.wait(), 5)
        assert entry(cp, "ratings-127.0.0.8") is not None
        deleted, problems = cp.store.delete_keys([("WorkloadGroup", "shop", "ratings")])
        assert deleted and not problems
        await eventually(lambda: entry(cp, "ratings-127.0.0.8") is None, timeout=5)
        await eventually(lambda: "WorkloadGroup shop/ratings was deleted" in reg.last_error
                         or "cannot find WorkloadGroup shop/ratings" in reg.last_error,
                         timeout=5)  # fmt: skip
        # the group comes back: the registrant registers again by itself
        cp.store.apply_text(GROUP, "group.yaml")
        await eventually(lambda: entry(cp, "ratings-127.0.0.8") is not None, timeout=10)
    finally:
        await _stop(task)


async def test_a_registered_workload_gets_fresh_tokens_for_its_identity(
    cp: ControlPlane,
) -> None:
    cp.autoregister.token_refresh = 0.2
    reg = registration(cp)
    first = reg.token
    tokens: list[str] = []
    reg.on_token = tokens.append
    task = await _run(reg)
    try:
        reg.register({"address": "127.0.0.6", "node": "n", "inbound": {}})
        await eventually(lambda: len(tokens) >= 3, timeout=5)  # at registration, then periodic
        assert reg.token == tokens[-1] != first
        for token in tokens:
            sid = cp.identity.tokens.verify(token)
            assert sid == "spiffe://cluster.local/ns/shop/sa/ratings-sa"
    finally:
        await _stop(task)


async def test_after_a_control_plane_restart_the_registrant_registers_again() -> None:
    key = b"r" * 32
    cp = ControlPlane(observability=False, debounce=0.01, token_key=key)
    await cp.start()
    port = int(cp.url.rsplit(":", 1)[1])
    cp.store.apply_text(GROUP, "group.yaml")
    reg = registration(cp)
    again: list[str] = []

    async def on_registered(url: str) -> None:
        again.append(url)

    reg.on_registered = on_registered
    task = await _run(reg)
    new: ControlPlane | None = None
    try:
        reg.register({"address": "127.0.0.4", "node": "n", "inbound": {"9080": 15003}})
        await asyncio.wait_for(reg.registered.wait(), 5)
        await cp.stop()
        new = ControlPlane(observability=False, debounce=0.01, token_key=key)
        await new.start(port=port)
        new.store.apply_text(GROUP, "group.yaml")
        plane = new
        await eventually(lambda: entry(plane, "ratings-127.0.0.4") is not None, timeout=15)
        await eventually(lambda: again == [plane.url], timeout=5)
    finally:
        await _stop(task)
        if new is not None:
            await new.stop()


async def test_a_token_of_another_control_plane_is_explained(cp: ControlPlane) -> None:
    other = ControlPlane(observability=False)
    token = other.identity.token_for("shop", "ratings-sa")  # signed with another key
    reg = WorkloadRegistration([cp.url], token, "shop", "ratings")
    task = await _run(reg)
    try:
        with pytest.raises(RegistrationRefused) as exc:
            await reg.wait_group(1.5)
        assert "401 the control plane refused the bootstrap token" in str(exc.value)
    finally:
        await _stop(task)

"""Control-plane replicas sharing one real etcd: config, registry, proxies, CA, CAS, leader."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from diktyo.api import load_text
from diktyo.control.backend import StoreConflict, StoreUnavailable
from diktyo.control.etcd import secrets
from diktyo.control.etcd.backend import EtcdBackend, parse_etcd_url
from diktyo.control.model import ProxyNode, Service, ServicePort, WorkloadInstance
from diktyo.control.server import ControlPlane
from diktyo.snapshot.model import Node
from diktyo.testing.controlplane import YAML, admin_session
from diktyo.testing.etcd import EtcdCluster
from diktyo.testing.wait import eventually

SVC = Service(hostname="x.default.svc.cluster.local", short_name="x", ports=(ServicePort(9080),))


def vs(name: str, host: str = "x", timeout: str = "7s") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [{host}]
  http:
  - timeout: {timeout}
    route:
    - destination: {{host: {host}}}
"""


async def _apply(cp: ControlPlane, text: str, source: str = "vs.yaml") -> tuple[int, dict]:
    async with (
        admin_session(cp) as s,
        s.post(cp.url + "/v1/config", params={"source": source}, data=text, headers=YAML) as r,
    ):
        return r.status, await r.json()


async def test_apply_on_one_replica_is_served_by_every_replica(replicas) -> None:
    from diktyo.proxy.config_client import ConfigClient

    a, b = await replicas(2)
    a.registry.add_service(SVC)
    proxy = ProxyNode(node=Node(id="p-1.default", workload="p"))
    b.add_proxy(proxy)
    client = ConfigClient(b.url, "p-1.default", lambda s: None, token=b.sidecar_token(proxy))
    client.start()
    try:
        await client.wait_ready(10)
        status, body = await _apply(a, vs("x-route"), "routes/x.yaml")
        assert status == 200, body
        key = ("VirtualService", "default", "x-route")
        await eventually(lambda: key in b.store.resource_keys(), timeout=5, what="watch on b")
        res = next(r for r in b.store.resources if r.name == "x-route")
        assert (res.file, res.line) == ("routes/x.yaml", 1)  # origin survives the round trip

        # b's push reacted to the watch: the sidecar on b got the applied route
        def routed() -> bool:
            snap = client.snapshot
            return snap is not None and any(
                vh.name.startswith("x.default") and [r.timeout for r in vh.routes] == [7.0]
                for table in snap.route_tables
                for vh in table.virtual_hosts
            )

        await eventually(routed, timeout=5, what="b pushed the applied route")
        # the proxy registered on b is known to a, but only b (its replica) translates it
        await eventually(lambda: "p-1.default" in a.proxies, timeout=5)
        assert a.cache.get("p-1.default") is None and b.cache.get("p-1.default") is not None
        # delete through b removes it everywhere
        url = b.url + "/v1/config/VirtualService/default/x-route"
        async with admin_session(b) as s, s.delete(url) as r:
            assert r.status == 200
        await eventually(lambda: key not in a.store.resource_keys(), timeout=5)
        await eventually(lambda: not routed(), timeout=5, what="the route left the sidecar")
    finally:
        await client.close()


async def test_replicas_share_the_sealed_ca_and_token_key(replicas, etcd1: EtcdCluster) -> None:
    a, b = await replicas(2)
    assert a.identity.ca.root_cert_pem == b.identity.ca.root_cert_pem
    token = a.identity.token_for("default", "reviews")
    assert b.identity.tokens.verify(token) == "spiffe://cluster.local/ns/default/sa/reviews"
    # in etcd the CA key is ciphertext only
    kv = await a.backend.client.get("/diktyo/ca/identity")
    assert kv is not None and b"PRIVATE KEY" not in kv.value and b"BEGIN" not in kv.value


async def test_wrong_store_key_is_refused_with_a_clear_error(
    replicas, etcd1: EtcdCluster, tmp_path: Path
) -> None:
    await replicas(1)
    other = tmp_path / "other.key"
    cp = ControlPlane(
        observability=False,
        backend=EtcdBackend(etcd1.client_urls, key_file=other, replica_id="intruder"),
    )
    with pytest.raises(secrets.SealError, match="same --store-key-file"):
        await cp.start()


async def test_compare_and_swap_refuses_a_write_based_on_stale_revisions(replicas) -> None:
    a, b = await replicas(2)
    files = [("v.yaml", vs("shared"))]
    res = load_text(files[0][1], "v.yaml").resources
    await a.backend.commit(res, files)
    key = ("VirtualService", "default", "shared")
    await eventually(lambda: key in b.backend.config_revisions, timeout=5)
    # b writes a newer version; a's next write still carries the revision a validated
    stale = dict(a.backend.config_revisions)
    await b.backend.commit(
        load_text(vs("shared", "y"), "v.yaml").resources, [("v.yaml", vs("shared", "y"))]
    )
    a.backend.config_revisions.update(stale)  # as if a's watch had not delivered it yet
    with pytest.raises(StoreConflict):
        await a.backend.commit(res, files)
    assert a.backend.stats["conflicts"] == 1


async def test_concurrent_applies_through_two_replicas_are_all_stored(replicas) -> None:
    a, b = await replicas(2)
    # the same resource changed 10 times through each replica at once, plus 10 new ones each
    texts = [(cp, vs("hot", "x", f"{i + 1}s")) for i in range(10) for cp in (a, b)]
    texts += [
        (cp, vs(f"own-{cp.backend.replica_id}-{i}", f"own-{cp.backend.replica_id}-{i}"))
        for i in range(10)
        for cp in (a, b)
    ]
    results = await asyncio.gather(*(_apply(cp, t) for cp, t in texts))
    assert [s for s, _ in results] == [200] * len(texts), [b for s, b in results if s != 200]
    # every apply was acknowledged (stored in etcd); b's writes reach a's store through a's
    # watch, asynchronously: wait for it, then the same assertion
    wanted = {f"own-r{r}-{i}" for r in (0, 1) for i in range(10)}
    await eventually(
        lambda: wanted <= {k[2] for k in a.store.resource_keys()}, timeout=5, what="watch on a"
    )
    names = {k[2] for k in a.store.resource_keys()}
    assert wanted <= names
    await eventually(lambda: a.backend.config_revisions == b.backend.config_revisions, timeout=5)
    kv = await a.backend.client.get("/diktyo/config/VirtualService/default/hot")
    assert (
        kv is not None
        and kv.mod_revision == a.backend.config_revisions[("VirtualService", "default", "hot")]
    )


async def test_one_leader_and_a_new_one_when_it_stops(replicas) -> None:
    a, b, c = await replicas(3, lease_ttl=2)
    cps = [a, b, c]
    await eventually(lambda: sum(cp.backend.is_leader for cp in cps) == 1, timeout=10)
    leader = next(cp for cp in cps if cp.backend.is_leader)
    rest = [cp for cp in cps if cp is not leader]
    assert all(cp.backend.leader == leader.backend.replica_id for cp in rest)
    await leader.stop()  # revokes its lease
    await eventually(lambda: sum(cp.backend.is_leader for cp in rest) == 1, timeout=10)
    assert {r["id"] for r in rest[0].backend.describe()["replicas"]} == {
        cp.backend.replica_id for cp in rest
    }


async def test_registration_unhealthy_past_its_grace_is_removed_by_the_leader(replicas) -> None:
    a, b = await replicas(2)
    for cp in (a, b):
        cp.backend.registration_grace = 0.5
    inst = WorkloadInstance(
        name="gone-1", workload="gone", address="127.0.0.1", ports={9080: 1}, services=()
    )
    a.registry.add_instance(inst)
    await eventually(lambda: "gone-1" in b.registry.instances, timeout=5)
    a.registry.set_healthy("gone-1", False)
    await eventually(lambda: "gone-1" not in a.registry.instances, timeout=10)
    await eventually(lambda: "gone-1" not in b.registry.instances, timeout=5)


async def test_apply_without_etcd_fails_naming_the_cause(replicas, etcd1: EtcdCluster) -> None:
    (a,) = await replicas(1)
    a.backend.client.timeout = 1.0
    etcd1.stop_member(0)
    status, body = await _apply(a, vs("late"))
    assert status == 503
    assert "config not stored" in body["error"] and "majority of the etcd members" in body["error"]
    assert ("VirtualService", "default", "late") not in a.store.resource_keys()
    # the replica says so: /v1/replicas (and the dashboard) show etcd unreachable
    await eventually(lambda: not a.backend.describe()["etcd_reachable"], timeout=10)
    assert a.backend.stats["lease_failures"] > 0 and not a.backend.is_leader


async def test_start_without_etcd_says_so(tmp_path: Path) -> None:
    cp = ControlPlane(
        observability=False,
        backend=EtcdBackend(["http://127.0.0.1:9"], key_file=tmp_path / "k", timeout=0.5),
    )
    with pytest.raises(StoreUnavailable, match="not answering"):
        await cp.start()


def test_store_urls() -> None:
    assert parse_etcd_url("etcd://127.0.0.1:2379,h:22379") == [
        "http://127.0.0.1:2379",
        "http://h:22379",
    ]
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_etcd_url("etcd://nohost")


async def test_config_client_fails_over_and_resyncs_by_version(replicas) -> None:
    from diktyo.proxy.config_client import ConfigClient

    a, b = await replicas(2)
    proxy = ProxyNode(node=Node(id="p-1.default", workload="p"))
    # registered over HTTP with every default spelled out, as a client may send them: a's
    # objects then hold freshly decoded strings, b's come from etcd
    node = {"id": "p-1.default", "workload": "p", "namespace": "default", "mode": "sidecar",
            "service_account": "default", "trust_domain": "cluster.local"}  # fmt: skip
    svc = {"hostname": SVC.hostname, "short_name": "x", "namespace": "default",
           "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
           "resolution": "STATIC", "source": "registry"}  # fmt: skip
    async with admin_session(a) as s:
        for path, body in (("services", svc), ("proxies", {"node": node})):
            async with s.post(f"{a.url}/v1/registry/{path}", json=body) as r:
                assert r.status == 200, await r.text()
    await eventually(lambda: "p-1.default" in b.proxies, timeout=5)
    await eventually(lambda: SVC.hostname in b.registry.services, timeout=5)
    client = ConfigClient(
        [a.url, b.url], "p-1.default", lambda s: None, token=a.sidecar_token(proxy)
    )
    client.start()
    try:
        await client.wait_ready(10)
        await eventually(lambda: b.backend.connection_of("p-1.default") == "r0", timeout=5)
        received = client.stats["received"]
        before = (client.version, a.cache.get("p-1.default").version)
        await a.stop()  # the replica goes away
        await eventually(lambda: client.url == b.url, timeout=5)
        await eventually(lambda: b.backend.connection_of("p-1.default") == "r1", timeout=5)
        # b holds the same content under its own version: nothing is sent again
        await asyncio.sleep(0.5)  # real time: an idle period in which nothing may be sent
        assert client.stats["received"] == received, (before, b.cache.get("p-1.default").version)
        assert client.stats["failovers"] >= 1
        # a change applied through b reaches the client
        status, body = await _apply(b, vs("after-failover", "x", "9s"))
        assert status == 200, body
        await eventually(lambda: client.stats["received"] == received + 1, timeout=5)
        assert client.snapshot is not None
        assert [
            r.timeout
            for t in client.snapshot.route_tables
            for vh in t.virtual_hosts
            if vh.name.startswith("x.default")
            for r in vh.routes
        ] == [9.0]
    finally:
        await client.close()


def test_config_client_takes_a_list_of_replicas() -> None:
    from diktyo.proxy.config_client import ConfigClient

    c = ConfigClient("http://a:1/, http://b:2", "n", lambda s: None)
    assert c.urls == ["http://a:1", "http://b:2"] and c.url == "http://a:1"
    with pytest.raises(ValueError, match="at least one"):
        ConfigClient("", "n", lambda s: None)


async def test_only_the_leader_health_checks(replicas) -> None:
    a, b = await replicas(2, health_interval=0.1)
    probes = {a.backend.replica_id: 0, b.backend.replica_id: 0}

    def counting(cp: ControlPlane):  # type: ignore[no-untyped-def]
        async def probe(url: str) -> bool:
            probes[cp.backend.replica_id] += 1
            return False

        return probe

    a.health_checker.probe = counting(a)  # type: ignore[method-assign]
    b.health_checker.probe = counting(b)  # type: ignore[method-assign]
    inst = WorkloadInstance(
        name="w-1", workload="w", address="127.0.0.1", ports={9080: 1}, services=()
    )
    a.registry.add_instance(inst, admin_url="http://127.0.0.1:9")
    await eventually(lambda: "w-1" in b.registry.admin_urls, timeout=5)
    await eventually(lambda: a.backend.is_leader or b.backend.is_leader, timeout=10)
    leader, follower = (a, b) if a.backend.is_leader else (b, a)
    before = dict(probes)
    await eventually(
        lambda: probes[leader.backend.replica_id] > before[leader.backend.replica_id] + 3,
        timeout=5,
    )
    assert probes[follower.backend.replica_id] == before[follower.backend.replica_id]
    # the leader's verdict reaches the follower through etcd
    await eventually(lambda: not follower.registry.instances["w-1"].healthy, timeout=10)


async def test_ca_root_rotated_by_the_leader_reaches_every_replica(replicas) -> None:
    a, b = await replicas(2)
    await eventually(lambda: a.backend.is_leader or b.backend.is_leader, timeout=10)
    leader, follower = (a, b) if a.backend.is_leader else (b, a)
    old = follower.identity.ca.root_cert_pem
    leader.backend.ca_rotate_before = 1.0  # the root is due now
    await leader.backend._rotate_ca_if_due()
    leader.backend.ca_rotate_before = 0.2
    from diktyo.security.certs import cert_pem

    announced = leader.identity.ca._roots[0]
    new = cert_pem(announced.cert)
    assert new != old
    # phase one everywhere: the new root is trusted at once, the old one still signs
    await eventually(lambda: new in follower.identity.ca.trust_bundle_pem(), timeout=5)
    assert old in follower.identity.ca.trust_bundle_pem()
    assert follower.identity.ca.root_cert_pem == old
    assert follower.identity.ca._roots[0].active_from == announced.active_from > time.time()


async def test_apply_lost_to_other_writers_every_time_is_refused_whole(replicas) -> None:
    a, b = await replicas(2)
    status, _ = await _apply(b, vs("shared", "x", "3s"))
    assert status == 200
    key = ("VirtualService", "default", "shared")
    await eventually(lambda: key in a.backend.config_revisions, timeout=5)
    a.backend.config_revisions[key] -= 1  # a believes in a revision that is gone
    status, body = await _apply(a, vs("shared", "x", "4s") + "---\n" + vs("other", "other"))
    assert status == 409 and "other replicas kept changing" in body["error"], body
    assert a.backend.stats["conflicts"] == 8
    kv = await a.backend.client.get("/diktyo/config/VirtualService/default/shared")
    assert kv is not None and b"3s" in kv.value  # b's version stands
    assert await a.backend.client.get("/diktyo/config/VirtualService/default/other") is None

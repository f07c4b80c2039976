"""Explicit TCP listeners (no capture): inbound ones report ``reporter="destination"`` with
``request_protocol="tcp"`` and enforce AuthorizationPolicy with Istio's TCP rules; outbound ones
follow VirtualService ``tcp:`` routes. Real sidecar (in process), real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

from diktyo.api import load_text
from diktyo.control.model import ProxyNode, PushContext, Registry, Service, ServicePort
from diktyo.control.translate import translate
from diktyo.snapshot.model import (
    Cluster,
    ConnectionPool,
    Endpoint,
    Listener,
    Node,
    Snapshot,
    TcpRoute,
    WeightedCluster,
)
from diktyo.snapshot.security import AuthzPolicy, AuthzRule, Operation, SecurityConfig, Source
from diktyo.testing import eventually
from diktyo.testing.sidecar import start_sidecar


async def _echo(tag: bytes) -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(100)
        w.write(tag + data)
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _talk(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(100), 5)
    except ConnectionResetError:
        return b""
    finally:
        w.close()


def _inbound(app_port: int, *policies: AuthzPolicy) -> Snapshot:
    return Snapshot(
        version="1",
        node=Node(id="db-1.default", workload="db", services=("db.default.svc.cluster.local",)),
        listeners=(
            Listener(
                name="inbound|9000", direction="tcp", cluster="inbound|9000||", service_port=9000
            ),
        ),
        clusters=(
            Cluster(
                name="inbound|9000||",
                port=9000,
                direction="inbound",
                endpoints=(Endpoint(address="127.0.0.1", port=app_port),),
            ),
        ),
        security=SecurityConfig(authz=policies),
    )


async def _wait(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    await eventually(cond, timeout=10, interval=0.02, what=what)


async def test_inbound_tcp_listener_reports_destination_tcp_metrics() -> None:
    app, app_port = await _echo(b"echo:")
    try:
        async with start_sidecar(_inbound(app_port)) as h:
            assert await _talk(h.port("inbound|9000"), b"abc") == b"echo:abc"
            m = h.sidecar.stats.metrics
            text: list[str] = []

            def closed() -> bool:
                text.clear()
                m.collect(text)
                return any(
                    line.startswith("istio_tcp_connections_closed_total{")
                    and line.rstrip().endswith(" 1")
                    for line in text
                )

            await _wait(closed, "connection never closed")
            line = next(x for x in text if x.startswith("istio_tcp_received_bytes_total{"))
            assert 'reporter="destination"' in line
            assert 'request_protocol="tcp"' in line
            assert 'destination_service="db.default.svc.cluster.local"' in line
            assert line.rstrip().endswith(" 3")
    finally:
        app.close()


async def test_inbound_tcp_listener_enforces_authorization_with_tcp_rules() -> None:
    app, app_port = await _echo(b"echo:")
    local = AuthzRule(sources=(Source(ip_blocks=("127.0.0.0/8",)),))
    http_only = AuthzRule(operations=(Operation(ports=("9000",), methods=("GET",)),))
    try:
        allow_local = AuthzPolicy(name="local", rules=(local,))
        async with start_sidecar(_inbound(app_port, allow_local)) as h:
            assert await _talk(h.port("inbound|9000"), b"x") == b"echo:x"
        # an ALLOW rule with an HTTP-only field never matches a TCP connection: denied
        async with start_sidecar(
            _inbound(app_port, AuthzPolicy(name="m", rules=(http_only,)))
        ) as h:
            assert await _talk(h.port("inbound|9000"), b"x") == b""
            assert h.sidecar.stats.server["downstream_cx_rbac_denied"] == 1
        # a DENY rule drops its HTTP-only field and denies port 9000 altogether
        deny = AuthzPolicy(name="d", action="DENY", rules=(http_only,))
        async with start_sidecar(_inbound(app_port, allow_local, deny)) as h:
            assert await _talk(h.port("inbound|9000"), b"x") == b""
    finally:
        app.close()


async def test_outbound_tcp_listener_follows_tcp_routes() -> None:
    v1, p1 = await _echo(b"v1:")
    v2, p2 = await _echo(b"v2:")
    try:
        snap = Snapshot(
            version="1",
            node=Node(id="c.default", workload="c"),
            listeners=(Listener(
                name="outbound|db:9000", direction="tcp", cluster="outbound|9000||db",
                service_port=9000,
                tcp_routes=(TcpRoute(clusters=(WeightedCluster(cluster="outbound|9000|v2|db"),)),),
            ),),
            clusters=(
                Cluster(name="outbound|9000||db", service="db", port=9000,
                        endpoints=(Endpoint(address="127.0.0.1", port=p1),)),
                Cluster(name="outbound|9000|v2|db", service="db", port=9000, subset="v2",
                        endpoints=(Endpoint(address="127.0.0.1", port=p2),)),
            ),
        )  # fmt: skip
        async with start_sidecar(snap) as h:
            assert await _talk(h.port("outbound|db:9000"), b"q") == b"v2:q"
    finally:
        v1.close()
        v2.close()


def test_translate_gives_local_tcp_ports_their_tcp_routes() -> None:
    vs = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tcp:
  - route:
    - {destination: {host: db, subset: v2}, weight: 100}
"""
    result = load_text(vs, "vs.yaml")
    assert result.errors == []
    db = Service(hostname="db.default.svc.cluster.local", short_name="db",
                 ports=(ServicePort(9000, "tcp-db", "TCP"),))  # fmt: skip
    push = PushContext(resources=tuple(result.resources), registry=Registry(services=(db,)))
    proxy = ProxyNode(node=Node(id="c.default", workload="c"),
                      local_ports={"db.default.svc.cluster.local:9000": 0})  # fmt: skip
    snap = translate(proxy, push)
    (lst,) = [x for x in snap.listeners if x.direction == "tcp"]
    assert [wc.cluster for r in lst.tcp_routes for wc in r.clusters] == [
        "outbound|9000|v2|db.default.svc.cluster.local"
    ]
    assert "outbound|9000|v2|db.default.svc.cluster.local" in {c.name for c in snap.clusters}


async def test_tcp_max_connections_is_enforced_with_uo() -> None:
    """DestinationRule connectionPool.tcp.maxConnections limits TCP proxying too: the
    connection over the limit is closed, counted as an overflow, flagged UO."""
    held: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)
        data = await r.read(100)
        w.write(b"ok:" + data)
        await w.drain()
        await r.read()  # until the client's FIN (passed on by the proxy), then close
        w.close()

    app = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = app.sockets[0].getsockname()[1]
    snap = Snapshot(
        version="1",
        node=Node(id="c.default", workload="c"),
        listeners=(Listener(name="outbound|db:9000", direction="tcp",
                            cluster="outbound|9000||db", service_port=9000),),
        clusters=(Cluster(name="outbound|9000||db", service="db", port=9000,
                          pool=ConnectionPool(max_connections=1),
                          endpoints=(Endpoint(address="127.0.0.1", port=port),)),),
    )  # fmt: skip
    try:
        async with start_sidecar(snap) as h:
            lport = h.port("outbound|db:9000")
            r1, w1 = await asyncio.open_connection("127.0.0.1", lport)
            w1.write(b"one")
            assert await asyncio.wait_for(r1.read(100), 5) == b"ok:one"
            assert await _talk(lport, b"two") == b""  # over the limit: closed at once
            stats = h.sidecar.stats
            assert stats.cluster_value("outbound|9000||db", "upstream_cx_overflow") == 1
            text: list[str] = []
            stats.metrics.collect(text)
            uo = [x for x in text if x.startswith("istio_tcp_connections_closed_total{")
                  and 'response_flags="UO"' in x]  # fmt: skip
            assert uo and uo[0].rstrip().endswith(" 1")
            w1.close()
            await _wait(lambda: h.sidecar.rt.clusters["outbound|9000||db"].breaker.connections == 0,
                        "the first connection never released its slot")  # fmt: skip
            assert await _talk(lport, b"three") == b"ok:three"
    finally:
        for w in held:
            w.close()
        app.close()

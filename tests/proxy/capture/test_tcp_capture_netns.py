"""The capture listeners for real: two network namespaces ("pods") with istio-iptables-like
REDIRECT rules, unmodified clients (curl, a raw socket) in pod A, a sidecar process in each
pod running as uid 1337, real servers in pod B.

A's sidecar receives the client's connections on 15001 and recovers the destination with
SO_ORIGINAL_DST; B's sidecar receives them on 15006. Nothing in the clients knows about it.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from diktyo.snapshot.model import (
    Capture,
    CaptureInbound,
    CaptureService,
    Cluster,
    Endpoint,
    Listener,
    Node,
    Route,
    RouteTable,
    Snapshot,
    TcpRoute,
    TcpRouteMatch,
    VirtualHost,
    WeightedCluster,
)

pytestmark = pytest.mark.slow

APP = r"""
import asyncio, sys

async def http(reader, writer, tag):
    head = await reader.readuntil(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].decode()
    host = [h for h in head.split(b"\r\n") if h.lower().startswith(b"host:")]
    body = f"{tag} {line} {host[0].decode() if host else '-'}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()
    writer.close()

async def echo(reader, writer, first=b""):
    data = first
    while True:
        if data:
            writer.write(b"hello " + data)
            await writer.drain()
        data = await reader.read(65536)
        if not data:
            break
    writer.close()

async def either(reader, writer):
    first = await reader.read(4)
    if first == b"GET ":
        reader.feed_data(b"")  # keep what follows in the buffer
        class R:
            async def readuntil(self, sep):
                return first + await reader.readuntil(sep)
        await http(R(), writer, "sniffed")
    else:
        await echo(reader, writer, first)

async def main():
    await asyncio.start_server(lambda r, w: http(r, w, "web"), "0.0.0.0", 8080)
    await asyncio.start_server(echo, "0.0.0.0", 7000)
    await asyncio.start_server(either, "0.0.0.0", 7001)
    await asyncio.start_server(lambda r, w: echo(r, w, b"v2:"), "0.0.0.0", 7002)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

WEB = "web.default.svc.cluster.local"
ECHO = "echo.default.svc.cluster.local"
AUTO = "auto.default.svc.cluster.local"


def _cluster(name: str, service: str, port: int, ep_port: int, proto: str = "tcp") -> Cluster:
    return Cluster(
        name=name,
        service=service,
        port=port,
        endpoints=(
            Endpoint(address="10.250.0.3", port=ep_port, workload="server", namespace="default"),
        ),
        protocol=proto,  # type: ignore[arg-type]
    )


def client_snapshot(policy: str = "ALLOW_ANY") -> Snapshot:
    web = f"outbound|8080||{WEB}"
    echo = f"outbound|7000||{ECHO}"
    echo_v2 = f"outbound|7000|v2|{ECHO}"
    echo6 = f"outbound|7000|v6|{ECHO}"
    auto = f"outbound|7001||{AUTO}"
    return Snapshot(
        version="1",
        node=Node(id="client.default", workload="client", interception_mode="REDIRECT"),
        listeners=(
            Listener(
                name="virtualOutbound", direction="capture_outbound", address="0.0.0.0", port=15001
            ),
        ),
        route_tables=(
            RouteTable(
                name="outbound",
                virtual_hosts=(
                    VirtualHost(
                        name=WEB,
                        domains=(f"{WEB}:8080", "web:8080", "web"),
                        routes=(Route(clusters=(WeightedCluster(cluster=web),)),),
                    ),
                    VirtualHost(
                        name=AUTO,
                        domains=(f"{AUTO}:7001",),
                        routes=(Route(clusters=(WeightedCluster(cluster=auto),)),),
                    ),
                ),
            ),
        ),
        clusters=(
            _cluster(web, WEB, 8080, 8080, "http"),
            _cluster(echo, ECHO, 7000, 7000),
            _cluster(echo_v2, ECHO, 7000, 7002),
            Cluster(
                name=echo6,
                service=ECHO,
                port=7000,
                subset="v6",
                protocol="tcp",
                endpoints=(Endpoint(address="fd00:250::3", port=7000, workload="server"),),
            ),
            _cluster(auto, AUTO, 7001, 7001),
        ),
        capture=Capture(
            outbound_traffic_policy=policy,  # type: ignore[arg-type]
            services=(
                CaptureService(
                    address="10.250.1.10", port=8080, host=WEB, protocol="http", cluster=web
                ),
                CaptureService(
                    address="10.250.1.11", port=7000, host=ECHO, protocol="tcp", cluster=echo
                ),
                CaptureService(
                    address="10.250.1.12", port=7001, host=AUTO, protocol="auto", cluster=auto
                ),
                # an IPv6 service address (ip6tables REDIRECT, IP6T_SO_ORIGINAL_DST)
                CaptureService(
                    address="fd00:250:1::11", port=7000, host=ECHO, protocol="tcp", cluster=echo6
                ),
                # a ServiceEntry-like CIDR whose tcp route sends 10.250.1.128/25 to v2
                CaptureService(
                    address="10.250.1.64/26",
                    port=7000,
                    host=ECHO,
                    protocol="tcp",
                    cluster=echo,
                    tcp_routes=(
                        TcpRoute(
                            matches=(TcpRouteMatch(destination_subnets=("10.250.1.96/27",)),),
                            clusters=(WeightedCluster(cluster=echo_v2),),
                        ),
                    ),
                ),
            ),
        ),
    )


def server_snapshot() -> Snapshot:
    def inbound(port: int) -> Cluster:
        return Cluster(
            name=f"inbound|{port}||",
            port=port,
            direction="inbound",
            endpoints=(Endpoint(address="127.0.0.1", port=port, workload="server"),),
        )

    return Snapshot(
        version="1",
        node=Node(
            id="server.default", workload="server", interception_mode="REDIRECT", services=(WEB,)
        ),
        listeners=(
            Listener(
                name="virtualInbound", direction="capture_inbound", address="0.0.0.0", port=15006
            ),
        ),
        clusters=(inbound(8080), inbound(7000), inbound(7001)),
        capture=Capture(
            inbound=(
                CaptureInbound(
                    port=8080, service_port=8080, protocol="http", cluster="inbound|8080||"
                ),
                CaptureInbound(
                    port=7000, service_port=7000, protocol="tcp", cluster="inbound|7000||"
                ),
                CaptureInbound(
                    port=7001, service_port=7001, protocol="auto", cluster="inbound|7001||"
                ),
            ),
        ),
    )


async def tcp_exchange(pods, ip: str, port: int, payload: bytes) -> bytes:
    """A raw TCP client in pod A (python, no proxy settings): send, half-close, read all."""
    code = (
        "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),5);b=b''\n"
        "try:\n s.sendall(sys.argv[3].encode());s.shutdown(socket.SHUT_WR)\n"
        " while True:\n  d=s.recv(65536)\n  if not d: break\n  b+=d\n"
        "except OSError as e: sys.stderr.write(f'closed by the proxy: {e}')\n"
        "sys.stdout.buffer.write(b)"
    )
    import sys

    rc, out, err = await pods.a.arun(sys.executable, "-c", code, ip, str(port), payload.decode())
    assert rc == 0, err.decode()
    return out


async def start_app(pods) -> None:
    import sys

    app = pods.tmp / "app.py"
    app.write_text(APP)
    p = await pods.b.start(sys.executable, str(app))
    assert p.stdout is not None
    assert (await asyncio.wait_for(p.stdout.readline(), 20)).strip() == b"ready"


async def test_outbound_and_inbound_capture_by_original_destination(pods) -> None:
    await start_app(pods)
    a = await pods.sidecar(pods.a, client_snapshot())
    b = await pods.sidecar(pods.b, server_snapshot())
    assert a["listeners"]["virtualOutbound"] == 15001
    assert b["listeners"]["virtualInbound"] == 15006

    # HTTP to a VIP, with curl and no proxy setting: routed as web, forwarded through B's 15006
    rc, out, err = await pods.a.arun(
        "curl", "-sS", "--max-time", "10", "http://10.250.1.10:8080/hello"
    )
    assert rc == 0, err.decode()
    assert out.lower() == b"web get /hello http/1.1 host: 10.250.1.10:8080"
    text = await pods.wait_metric(
        pods.a,
        a["admin"],
        "istio_requests_total",
        1,
        reporter="source",
        destination_service=WEB,
        response_code="200",
    )
    text = await pods.wait_metric(
        pods.b,
        b["admin"],
        "istio_requests_total",
        1,
        reporter="destination",
        response_code="200",
    )

    # TCP to a VIP: the declared tcp port; bytes counted by both sidecars
    assert await tcp_exchange(pods, "10.250.1.11", 7000, b"world") == b"hello world"
    text = await pods.wait_metric(
        pods.a,
        a["admin"],
        "istio_tcp_connections_closed_total",
        1,
        reporter="source",
        destination_service=ECHO,
    )
    sel = {"reporter": "source", "destination_service": ECHO, "request_protocol": "tcp"}
    assert pods.metric(text, "istio_tcp_connections_opened_total", **sel) == 1
    assert pods.metric(text, "istio_tcp_received_bytes_total", **sel) == 5
    assert pods.metric(text, "istio_tcp_sent_bytes_total", **sel) == 11
    text = await pods.wait_metric(
        pods.b, b["admin"], "istio_tcp_connections_closed_total", 1, reporter="destination"
    )
    assert pods.metric(text, "istio_tcp_received_bytes_total", reporter="destination") == 5
    assert pods.metric(text, "istio_tcp_sent_bytes_total", reporter="destination") == 11

    # a ServiceEntry-like CIDR with a tcp route on destinationSubnets: .100 -> v2, .70 -> default
    assert (
        await tcp_exchange(pods, "10.250.1.100", 7000, b"x") == b"hello v2:hello x"
    )  # via B's inbound passthrough (7002 undeclared)
    assert await tcp_exchange(pods, "10.250.1.70", 7000, b"y") == b"hello y"

    # IPv6 both ways: A's ip6tables OUTPUT rule -> 15001 ([::]), B's PREROUTING -> 15006
    assert await tcp_exchange(pods, "fd00:250:1::11", 7000, b"six") == b"hello six"
    text = await pods.wait_metric(pods.b, b["admin"], "istio_tcp_connections_closed_total", 4,
                                  reporter="destination")  # fmt: skip


async def test_unnamed_port_is_sniffed(pods) -> None:
    await start_app(pods)
    a = await pods.sidecar(pods.a, client_snapshot())
    b = await pods.sidecar(pods.b, server_snapshot())
    rc, out, err = await pods.a.arun("curl", "-sS", "--max-time", "10", "http://10.250.1.12:7001/s")
    assert rc == 0, err.decode()
    assert out.startswith(b"sniffed GET /s HTTP/1.1")
    assert await tcp_exchange(pods, "10.250.1.12", 7001, b"raw") == b"hello raw"
    text = await pods.wait_metric(
        pods.a, a["admin"], "istio_requests_total", 1, destination_service=AUTO
    )
    text = await pods.wait_metric(
        pods.a, a["admin"], "istio_tcp_connections_closed_total", 1, destination_service=AUTO
    )
    # one HTTP request and one TCP connection: nothing counted twice
    assert pods.metric(text, "istio_requests_total", destination_service=AUTO) == 1
    assert pods.metric(text, "istio_tcp_connections_opened_total", destination_service=AUTO) == 1
    text = await pods.wait_metric(
        pods.b, b["admin"], "istio_requests_total", 1, reporter="destination"
    )
    assert pods.metric(text, "istio_tcp_connections_opened_total", reporter="destination") == 1


async def test_outside_registry_allow_any_is_passthrough(pods) -> None:
    await start_app(pods)
    a = await pods.sidecar(pods.a, client_snapshot("ALLOW_ANY"))
    await pods.sidecar(pods.b, server_snapshot())
    # B's pod IP is no service VIP: PassthroughCluster to the original destination; B's
    # sidecar still captures it inbound (port 7000 is declared there)
    assert await tcp_exchange(pods, "10.250.0.3", 7000, b"direct") == b"hello direct"
    text = await pods.wait_metric(
        pods.a,
        a["admin"],
        "istio_tcp_connections_closed_total",
        1,
        destination_service_name="PassthroughCluster",
    )
    assert pods.metric(text, "istio_tcp_received_bytes_total",
                  destination_service_name="PassthroughCluster") == 6  # fmt: skip


async def test_outside_registry_registry_only_is_blackhole(pods) -> None:
    await start_app(pods)
    a = await pods.sidecar(pods.a, client_snapshot("REGISTRY_ONLY"))
    await pods.sidecar(pods.b, server_snapshot())
    assert await tcp_exchange(pods, "10.250.0.3", 7000, b"direct") == b""
    text = await pods.wait_metric(
        pods.a,
        a["admin"],
        "istio_tcp_connections_closed_total",
        1,
        destination_service_name="BlackHoleCluster",
        response_flags="UH",
    )
    assert pods.metric(text, "istio_tcp_connections_opened_total",
                  destination_service_name="BlackHoleCluster") == 1  # fmt: skip
    # the registry still works under REGISTRY_ONLY
    assert await tcp_exchange(pods, "10.250.1.11", 7000, b"in") == b"hello in"
    assert not re.search(r'destination_service_name="PassthroughCluster"', text)


async def test_interception_mode_redirect_without_capture_config_passes_through(pods) -> None:
    """DIKTYO_INTERCEPTION_MODE=REDIRECT with a snapshot that has no capture listeners (the
    node was not registered REDIRECT): the sidecar opens 15001/15006 itself in passthrough,
    so the app's redirected connections still work."""
    await start_app(pods)
    plain = Snapshot(version="1", node=Node(id="client.default", workload="client"))
    a = await pods.sidecar(pods.a, plain, env={"DIKTYO_INTERCEPTION_MODE": "redirect"})
    assert a["listeners"]["virtualOutbound"] == 15001
    await pods.sidecar(pods.b, server_snapshot())
    assert await tcp_exchange(pods, "10.250.0.3", 7000, b"anyway") == b"hello anyway"
    text = await pods.wait_metric(pods.a, a["admin"], "istio_tcp_connections_closed_total", 1,
                                  destination_service_name="PassthroughCluster")  # fmt: skip
    assert pods.metric(text, "istio_tcp_received_bytes_total") == 6
    # without the mode, the same snapshot opens no capture listener at all
    b = await pods.sidecar(pods.b, plain)
    assert "virtualOutbound" not in b["listeners"]


async def test_http2_on_captured_ports_is_routed_as_http(pods) -> None:
    """An HTTP/2 client (curl, prior knowledge, no proxy settings) on a declared HTTP port and
    on a sniffed port gets L7 handling: routed, counted in istio_requests_total, not tunnelled
    as TCP. (Before, a sniffed HTTP/2 preface was proxied as TCP.)"""
    await start_app(pods)
    a = await pods.sidecar(pods.a, client_snapshot())
    b = await pods.sidecar(pods.b, server_snapshot())
    for url, want in (
        ("http://10.250.1.10:8080/h2", b"web get /h2 http/1.1 host: 10.250.1.10:8080"),
        ("http://10.250.1.12:7001/h2s", b"sniffed get /h2s http/1.1"),
    ):
        rc, out, err = await pods.a.arun(
            "curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-o", "-",
            "-w", "\n%{http_version}", url,
        )  # fmt: skip
        assert rc == 0, err.decode()
        body, _, version = out.rpartition(b"\n")
        assert version == b"2", out  # the client spoke HTTP/2 to the capture listener
        assert body.lower().startswith(want), body
    text = await pods.wait_metric(
        pods.a, a["admin"], "istio_requests_total", 1, reporter="source", destination_service=AUTO
    )
    assert (
        pods.metric(text, "istio_requests_total", reporter="source", destination_service=WEB) == 1
    )
    # nothing went through as a TCP tunnel
    assert pods.metric(text, "istio_tcp_connections_opened_total", destination_service=AUTO) == 0
    assert pods.metric(text, "istio_tcp_connections_opened_total", destination_service=WEB) == 0
    await pods.wait_metric(pods.b, b["admin"], "istio_requests_total", 2, reporter="destination")

"""Pure parts of capture: sockaddr parsing, protocol sniffing, original-destination lookups,
TCP routes, TCP authorization semantics."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from pathlib import Path

import msgspec
import pytest

from diktyo.proxy.capture.original_dst import original_dst, parse_sockaddr
from diktyo.proxy.capture.server import Sniffer
from diktyo.proxy.capture.sniff import H2_PREFACE, detect
from diktyo.proxy.capture.table import CaptureTable, CompiledTcpRoutes, weighted_choice
from diktyo.proxy.tcp_authz import TcpAuthz, rule_uses_http, tcp_policies
from diktyo.snapshot.codec import SnapshotError, decode, encode, validate
from diktyo.snapshot.model import (
    Capture,
    CaptureInbound,
    CaptureService,
    Node,
    Snapshot,
    TcpRoute,
    TcpRouteMatch,
    WeightedCluster,
)
from diktyo.snapshot.security import (
    AuthzPolicy,
    AuthzRule,
    Condition,
    Operation,
    SecurityConfig,
    Source,
)


def test_parse_sockaddr_v4_and_v6() -> None:
    v4 = (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", 9080)
        + bytes([10, 96, 0, 7])
        + b"\0" * 8
    )
    assert parse_sockaddr(v4) == ("10.96.0.7", 9080)
    v6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!H", 443)
        + b"\0" * 4
        + socket.inet_pton(socket.AF_INET6, "fd00::5")
        + b"\0" * 4
    )
    assert parse_sockaddr(v6) == ("fd00::5", 443)
    with pytest.raises(ValueError):
        parse_sockaddr(b"\0\0")


def test_original_dst_of_a_socket_that_was_not_redirected_raises() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    try:
        with pytest.raises(OSError):
            original_dst(s)
    finally:
        for x in (s, c, srv):
            x.close()


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\n", "http1"),
        (b"POST / HTTP/1.0\r\n", "http1"),
        (b"M-SEARCH * HTTP/1.1\r\n", "http1"),
        (b"GET / HTTP/1.1", None),  # request line not finished: read more
        (b"GE", None),
        (H2_PREFACE, "http2"),
        (H2_PREFACE[:10], None),  # also an HTTP/1 request line prefix: wait
        (b"\x16\x03\x01\x02\x00\x01\x00", "tls"),
        (b"\x16\x03", None),
        (b"*1\r\n$4\r\nPING\r\n", "tcp"),  # Redis RESP
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "tcp"),  # PostgreSQL SSLRequest
        (b"GET / SPDY/3\r\n", "tcp"),
        (b" GET / HTTP/1.1\r\n", "tcp"),
    ],
)
def test_detect(prefix: bytes, kind: str | None) -> None:
    assert detect(prefix) == kind


def _svc(address: str, port: int, host: str, **kw: object) -> CaptureService:
    kw.setdefault("cluster", f"outbound|{port}||{host}")
    return CaptureService(address=address, port=port, host=host, **kw)  # type: ignore[arg-type]


def test_capture_table_exact_beats_cidr_and_longest_prefix_wins() -> None:
    t = CaptureTable(
        Capture(
            services=(
                _svc("10.0.0.0/8", 80, "wide"),
                _svc("10.1.0.0/16", 80, "narrow"),
                _svc("10.1.2.3", 80, "exact"),
                _svc("fd00::1", 80, "six"),
            ),
            inbound=(CaptureInbound(port=9080, service_port=9080, cluster="inbound|9080||"),),
        )
    )
    assert t.outbound("10.1.2.3", 80).host == "exact"  # type: ignore[union-attr]
    assert t.outbound("10.1.9.9", 80).host == "narrow"  # type: ignore[union-attr]
    assert t.outbound("10.200.0.1", 80).host == "wide"  # type: ignore[union-attr]
    assert t.outbound("fd00::1", 80).host == "six"  # type: ignore[union-attr]
    assert t.outbound("10.1.2.3", 81) is None
    assert t.outbound("192.168.0.1", 80) is None
    assert t.inbound(9080).cluster == "inbound|9080||"  # type: ignore[union-attr]
    assert t.inbound(9081) is None


def test_tcp_routes_first_match_wins_and_default_cluster_otherwise() -> None:
    r1 = TcpRoute(
        matches=(TcpRouteMatch(port=27017, destination_subnets=("10.2.0.0/16",)),),
        clusters=(WeightedCluster(cluster="a"),),
    )
    r2 = TcpRoute(matches=(TcpRouteMatch(port=27018),), clusters=(WeightedCluster(cluster="b"),))
    routes = CompiledTcpRoutes((r1, r2))
    assert routes.match("10.2.3.4", 27017) is r1
    assert routes.match("10.3.3.4", 27017) is None  # subnet fails
    assert routes.match("10.3.3.4", 27018) is r2
    svc = _svc("10.9.0.1", 27017, "db", tcp_routes=(r1,))
    t = CaptureTable(Capture(services=(svc,)))
    rng = random.Random(1)
    assert t.tcp_cluster(svc, "10.9.0.1", 27017, rng) == "outbound|27017||db"  # no match: default
    assert t.tcp_cluster(svc, "10.2.0.1", 27017, rng) == "a"


def test_weighted_choice_follows_weights() -> None:
    rng = random.Random(7)
    wcs = (WeightedCluster(cluster="v1", weight=80), WeightedCluster(cluster="v2", weight=20))
    picks = [weighted_choice(wcs, rng).cluster for _ in range(5000)]
    share = picks.count("v2") / len(picks)
    assert 0.17 < share < 0.23
    assert weighted_choice((WeightedCluster(cluster="only", weight=0),), rng).cluster == "only"


def test_snapshot_with_capture_round_trips_and_is_validated() -> None:
    snap = Snapshot(
        version="1",
        node=Node(id="a", workload="a", interception_mode="REDIRECT"),
        capture=Capture(
            services=(_svc("10.0.0.1", 80, "x"),),
            inbound=(CaptureInbound(port=1, cluster="inbound|1||"),),
        ),
    )
    assert msgspec.json.decode(encode(snap), type=Snapshot) == snap
    with pytest.raises(SnapshotError, match="unknown cluster"):
        decode(encode(snap))
    problems = validate(snap)
    assert "capture service x:80 (10.0.0.1): unknown cluster 'outbound|80||x'" in problems
    assert "capture inbound port 1: unknown cluster 'inbound|1||'" in problems
    bad = Snapshot(
        version="1",
        node=Node(id="a", workload="a"),
        capture=Capture(services=(_svc("10.0.0.300", 80, "x", cluster=""),)),
    )
    assert any("address" in p for p in validate(bad))


SPIFFE = "spiffe://cluster.local/ns/default/sa/client"


def _authz(*policies: AuthzPolicy) -> TcpAuthz:
    return TcpAuthz(SecurityConfig(authz=policies))


def test_tcp_allow_by_port_principal_and_ip() -> None:
    az = _authz(
        AuthzPolicy(
            name="p",
            rules=(
                AuthzRule(
                    sources=(Source(principals=("cluster.local/ns/default/sa/client",)),),
                    operations=(Operation(ports=("6379",)),),
                ),
            ),
        )
    )
    assert az.check(6379, SPIFFE, "10.0.0.2").allowed
    assert not az.check(6380, SPIFFE, "10.0.0.2").allowed
    assert not az.check(6379, "spiffe://cluster.local/ns/default/sa/other", "10.0.0.2").allowed
    assert not az.check(6379, "", "10.0.0.2").allowed  # plaintext: no principal
    ip = _authz(
        AuthzPolicy(
            name="ip",
            action="DENY",
            rules=(AuthzRule(sources=(Source(ip_blocks=("10.0.0.0/24",)),)),),
        )
    )
    assert not ip.check(6379, "", "10.0.0.9").allowed
    assert ip.check(6379, "", "10.0.1.9").allowed


def test_tcp_allow_rule_with_http_only_fields_never_matches() -> None:
    # Istio: an ALLOW rule naming methods is left out for TCP; the policy then denies all
    pol = AuthzPolicy(
        name="p", rules=(AuthzRule(operations=(Operation(ports=("9000",), methods=("GET",)),)),)
    )
    assert rule_uses_http(pol.rules[0])
    assert tcp_policies((pol,))[0].rules == ()
    assert not _authz(pol).check(9000, SPIFFE, "10.0.0.2").allowed


def test_tcp_deny_rule_with_http_only_fields_denies_more() -> None:
    # Istio: a DENY rule's HTTP-only fields are dropped, the rest (port 9000) still applies
    deny = AuthzPolicy(
        name="d",
        action="DENY",
        rules=(
            AuthzRule(
                operations=(Operation(ports=("9000",), methods=("GET",)),),
                conditions=(Condition(key="request.headers[x-a]", values=("1",)),),
            ),
        ),
    )
    az = _authz(deny)
    assert not az.check(9000, SPIFFE, "10.0.0.2").allowed
    assert az.check(9001, SPIFFE, "10.0.0.2").allowed
    rp = AuthzPolicy(
        name="rp",
        action="DENY",
        rules=(AuthzRule(sources=(Source(request_principals=("iss/sub",)),)),),
    )
    assert not _authz(rp).check(1, "", "10.0.0.2").allowed  # emptied source matches everyone


def test_unknown_interception_mode_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    snap = tmp_path / "s.json"
    snap.write_bytes(encode(Snapshot(version="1", node=Node(id="a", workload="a"))))
    r = subprocess.run(
        [sys.executable, "-m", "diktyo.proxy", "--snapshot", str(snap), "--interception-mode",
         "tproxy", "--admin-token-file", str(tmp_path / "tok")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert "interception mode 'TPROXY' is not one of NONE, REDIRECT" in r.stderr


class _Banner(asyncio.Protocol):
    """Stands for a server-first protocol behind the sniffer: speaks as soon as it is chosen."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"220 ready\r\n")  # type: ignore[attr-defined]  # a Transport here


async def _sniffed_silent_client(timeout: float) -> tuple[bytes, list[str]]:
    loop = asyncio.get_running_loop()
    decided: list[str] = []
    server = await loop.create_server(
        lambda: Sniffer(lambda kind: _Banner(), timeout, loop, decided.append), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            got = await asyncio.wait_for(r.read(100), 1.0)
        except TimeoutError:
            got = b""
    finally:
        w.close()
        server.close()
    return got, decided


async def test_protocol_detection_timeout_makes_a_silent_connection_tcp() -> None:
    # meshConfig.protocolDetectionTimeout set: a client that waits for the server is TCP after it
    got, decided = await _sniffed_silent_client(0.1)
    assert (got, decided) == (b"220 ready\r\n", ["tcp"])
    # Istio's default (0): no timeout, the sniffer waits for the client's first bytes
    got, decided = await _sniffed_silent_client(0.0)
    assert (got, decided) == (b"", [])


def test_mesh_file_sets_outbound_policy_and_detection_timeout() -> None:
    from diktyo.platform.mesh import load_mesh_text, mesh_config

    spec = load_mesh_text(
        "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\nprotocolDetectionTimeout: 250ms\n", "m.yaml"
    )
    mesh = mesh_config(spec)
    assert (mesh.outbound_traffic_policy, mesh.protocol_detection_timeout) == (
        "REGISTRY_ONLY",
        0.25,
    )
    default = mesh_config(load_mesh_text("{}\n", "m.yaml"))
    assert (default.outbound_traffic_policy, default.protocol_detection_timeout) == (
        "ALLOW_ANY",
        0.0,
    )
    with pytest.raises(
        ValueError, match=r"outboundTrafficPolicy.mode: Input should be 'ALLOW_ANY'"
    ):
        load_mesh_text("outboundTrafficPolicy: {mode: DENY}\n", "m.yaml")
    with pytest.raises(ValueError, match="protocolDetectionTimeout: invalid duration 'soon'"):
        load_mesh_text("protocolDetectionTimeout: soon\n", "m.yaml")


class _Transport(asyncio.Transport):
    """Just enough of a transport for the sniffer's hand-off."""

    def __init__(self) -> None:
        super().__init__()
        self.proto: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.proto = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.proto is not None
        return self.proto

    def is_closing(self) -> bool:
        return False


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


class _HandsOn(_Recorder):
    """Like the listeners' HTTP sniffer after an ALPN ``h2`` handshake: it gives the
    connection to another protocol as soon as it is made."""

    def __init__(self, successor: _Recorder) -> None:
        super().__init__()
        self.successor = successor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_protocol(self.successor)
        self.successor.connection_made(transport)


def test_sniffed_bytes_go_to_the_protocol_the_connection_ended_up_with() -> None:
    """The bytes read while sniffing reach the transport's protocol after the hand-off, not the
    one chosen first when it already passed the connection on (an HTTP/2 connection picked by
    ALPN). Before the fix they went to the first one, which built a second HTTP/2 connection."""
    loop = asyncio.new_event_loop()
    try:
        final = _Recorder()
        first = _HandsOn(final)
        sniffer = Sniffer(lambda kind: first, 0, loop)
        t = _Transport()
        t.set_protocol(sniffer)
        sniffer.connection_made(t)
        sniffer.data_received(H2_PREFACE)
        assert t.get_protocol() is final
        assert final.data == H2_PREFACE and first.data == b""
    finally:
        loop.close()

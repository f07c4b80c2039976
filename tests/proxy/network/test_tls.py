"""Real TLS handshakes over 127.0.0.1 with the mesh contexts: accepted and refused peers."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from diktyo.control.ca import CertificateAuthority
from diktyo.core.clock import ManualClock
from diktyo.proxy.network.tls import (
    CertificateStore,
    InboundRefused,
    TlsConfigError,
    accept_inbound,
    client_context,
    describe_tls_error,
    peer_spiffe_id,
    server_context,
    verify_peer,
    xfcc_value,
)
from diktyo.security.certs import fingerprint, load_certs

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/reviews"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/bookinfo-productpage"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(trust_domain=TD)


def creds(
    ca: CertificateAuthority, sid: str, lifetime: float | None = None
) -> tuple[str, str, str]:
    key, issued = ca.issue(sid, lifetime)
    return issued.cert_chain_pem, key, ca.trust_bundle_pem()


class Server:
    """A plain TCP server that upgrades to TLS itself, so handshake errors are observable."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.peers: list[str | None] = []
        self.errors: list[str] = []
        self.server: asyncio.Server | None = None
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # asyncio.timeout, not wait_for: start_tls must run in the handler's own task
            async with asyncio.timeout(5):
                await writer.start_tls(self.ctx)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its reason
            self.errors.append(describe_tls_error(exc))
            writer.transport.abort()
            self.done.set()
            return
        sslobj = writer.get_extra_info("ssl_object")
        self.peers.append(peer_spiffe_id(sslobj))
        try:
            data = await asyncio.wait_for(reader.readline(), 5)
            writer.write(b"echo:" + data)
            await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.done.set()
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def talk(port: int, ctx: ssl.SSLContext) -> tuple[bytes, ssl.SSLObject]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        writer.write(b"hi\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(100), 5)
        return data, writer.get_extra_info("ssl_object")
    finally:
        writer.close()


async def test_mutual_tls_ok_and_peer_ids(ca: CertificateAuthority) -> None:
    srv = Server(server_context(*creds(ca, SERVER_ID), require_client_cert=True))
    async with srv as port:
        data, sslobj = await talk(port, client_context(*creds(ca, CLIENT_ID)))
    assert data == b"echo:hi\n"
    assert srv.peers == [CLIENT_ID]
    assert peer_spiffe_id(sslobj) == SERVER_ID
    assert sslobj.version() == "TLSv1.3"
    assert sslobj.selected_alpn_protocol() == "istio-http/1.1"
    assert verify_peer(sslobj, {SERVER_ID}) == (True, f"peer identity {SERVER_ID}")
    # principal form (no spiffe://) is accepted as expected identity too
    assert verify_peer(sslobj, {"cluster.local/ns/default/sa/reviews"})[0]
    assert verify_peer(sslobj, None)[0]


async def test_server_refuses_client_cert_from_another_ca(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate(trust_domain=TD)
    srv = Server(server_context(*creds(ca, SERVER_ID), require_client_cert=True))
    chain, key, _ = creds(other, CLIENT_ID)
    async with srv as port:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            data, _ = await talk(port, client_context(chain, key, ca.trust_bundle_pem()))
            if not data:  # TLS 1.3: the client learns of the rejection on its first read
                raise ConnectionError("closed")
        await asyncio.wait_for(srv.done.wait(), 5)
    assert srv.peers == []
    assert len(srv.errors) == 1 and "not signed by a root in our trust bundle" in srv.errors[0]


async def test_client_refuses_server_from_another_ca(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate(trust_domain=TD)
    srv = Server(server_context(*creds(other, SERVER_ID)))
    async with srv as port:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await talk(port, client_context(*creds(ca, CLIENT_ID)))
    assert "not signed by a root in our trust bundle" in describe_tls_error(info.value)


async def test_expired_client_cert_refused(ca: CertificateAuthority) -> None:
    clock = ManualClock(start=0.0, wall=dt.datetime.now(dt.UTC).timestamp() - 3 * 86400)
    ca.clock = clock  # issue in the past: valid for one hour, three days ago
    try:
        expired = creds(ca, CLIENT_ID, lifetime=3600)
    finally:
        from diktyo.core.clock import SYSTEM_CLOCK

        ca.clock = SYSTEM_CLOCK
    srv = Server(server_context(*creds(ca, SERVER_ID)))
    async with srv as port:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            data, _ = await talk(
                port, client_context(expired[0], expired[1], ca.trust_bundle_pem())
            )
            if not data:
                raise ConnectionError("closed")
        await asyncio.wait_for(srv.done.wait(), 5)
    assert len(srv.errors) == 1 and "expired" in srv.errors[0]


async def test_wrong_spiffe_id_refused_after_handshake(ca: CertificateAuthority) -> None:
    srv = Server(server_context(*creds(ca, "spiffe://cluster.local/ns/evil/sa/mallory")))
    async with srv as port:
        _, sslobj = await talk(port, client_context(*creds(ca, CLIENT_ID)))
    ok, reason = verify_peer(sslobj, {SERVER_ID})
    assert not ok
    assert "spiffe://cluster.local/ns/evil/sa/mallory is not one of the expected" in reason


def _cert_without_san(ca: CertificateAuthority) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    root = ca._roots[0]
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "no-san")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(root.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


async def test_cert_without_uri_san_refused(ca: CertificateAuthority) -> None:
    chain, key = _cert_without_san(ca)
    srv = Server(server_context(chain, key, ca.trust_bundle_pem()))
    async with srv as port:
        _, sslobj = await talk(port, client_context(*creds(ca, CLIENT_ID)))
    assert peer_spiffe_id(sslobj) is None
    ok, reason = verify_peer(sslobj, None)
    assert not ok and "no SPIFFE URI SAN" in reason


async def test_client_without_cert_refused_when_required(ca: CertificateAuthority) -> None:
    srv = Server(server_context(*creds(ca, SERVER_ID), require_client_cert=True))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.trust_bundle_pem())
    async with srv as port:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            data, _ = await talk(port, bare)
            if not data:
                raise ConnectionError("closed")
        await asyncio.wait_for(srv.done.wait(), 5)
    assert len(srv.errors) == 1 and "client presented no certificate" in srv.errors[0]


async def test_client_without_cert_accepted_when_optional(ca: CertificateAuthority) -> None:
    srv = Server(server_context(*creds(ca, SERVER_ID), require_client_cert=False))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.trust_bundle_pem())
    async with srv as port:
        data, _ = await talk(port, bare)
    assert data == b"echo:hi\n"
    assert srv.peers == [None]


async def test_store_rotation_keeps_existing_connections(ca: CertificateAuthority) -> None:
    store = CertificateStore()
    with pytest.raises(TlsConfigError, match="no workload certificate yet"):
        store.client_context()
    store.update(*creds(ca, SERVER_ID))
    first = store.server_context()
    assert store.server_context() is first  # cached per version
    srv = Server(first)
    async with srv as port:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(*creds(ca, CLIENT_ID))
        )
        old_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        store.update(*creds(ca, SERVER_ID))  # rotation
        assert store.version == 2 and store.server_context() is not first
        writer.write(b"still\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(100), 5) == b"echo:still\n"
        writer.close()
    srv2 = Server(store.server_context())
    async with srv2 as port:
        _, sslobj = await talk(port, client_context(*creds(ca, CLIENT_ID)))
    assert sslobj.getpeercert(binary_form=True) != old_der
    assert store.bundle is not None and store.bundle.spiffe_id == SERVER_ID


def test_bad_key_is_a_readable_error(ca: CertificateAuthority) -> None:
    chain, _, bundle = creds(ca, SERVER_ID)
    _, other_key, _ = creds(ca, SERVER_ID)
    with pytest.raises(TlsConfigError, match="cannot load certificate chain and key"):
        server_context(chain, other_key, bundle)


def test_xfcc_value(ca: CertificateAuthority) -> None:
    chain, _, _ = creds(ca, CLIENT_ID)
    der = load_certs(chain)[0].public_bytes(serialization.Encoding.DER)
    v = xfcc_value(SERVER_ID, der)
    assert v == f"By={SERVER_ID};Hash={fingerprint(der)};URI={CLIENT_ID}"
    assert len(fingerprint(der)) == 64
    # memoised per (us, certificate): another peer or another local identity is its own entry
    other_id = "spiffe://cluster.local/ns/default/sa/ratings"
    other = load_certs(creds(ca, other_id)[0])[0].public_bytes(serialization.Encoding.DER)
    assert (
        xfcc_value(SERVER_ID, other) == f"By={SERVER_ID};Hash={fingerprint(other)};URI={other_id}"
    )
    assert xfcc_value(other_id, der).startswith(f"By={other_id};Hash={fingerprint(der)}")
    assert xfcc_value(SERVER_ID, der) == v


async def test_openssl_s_client_shows_chain(ca: CertificateAuthority, tmp_path) -> None:
    chain, key, bundle = creds(ca, CLIENT_ID)
    (tmp_path / "c.pem").write_text(chain)
    (tmp_path / "k.pem").write_text(key)
    (tmp_path / "ca.pem").write_text(bundle)
    srv = Server(server_context(*creds(ca, SERVER_ID)))
    async with srv as port:
        proc = await asyncio.create_subprocess_exec(
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-showcerts",
            "-cert",
            str(tmp_path / "c.pem"),
            "-key",
            str(tmp_path / "k.pem"),
            "-CAfile",
            str(tmp_path / "ca.pem"),
            "-alpn",
            "istio-http/1.1",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(b"hi\n"), 20)
    text = out.decode(errors="replace")
    assert text.count("-----BEGIN CERTIFICATE-----") == 2  # leaf + root
    assert "Verify return code: 0 (ok)" in text
    assert "TLSv1.3" in text
    assert srv.peers == [CLIENT_ID]


# --------------------------------------------------------------------------- accept_inbound


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.peer = peer_spiffe_id(transport.get_extra_info("ssl_object"))

    def data_received(self, data: bytes) -> None:
        self.t.write(b"echo:" + data)  # type: ignore[attr-defined]


async def _accept_scenarios(ca: CertificateAuthority) -> list[tuple[str, str, str | None, bytes]]:
    """(mode, client kind) -> (reason or refusal, peer id, reply); runs on the current loop."""
    import socket

    loop = asyncio.get_running_loop()
    store = CertificateStore()
    store.update(*creds(ca, SERVER_ID))
    results: list[tuple[str, str, str | None, bytes]] = []
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.trust_bundle_pem())
    clients = {"mtls": client_context(*creds(ca, CLIENT_ID)), "plain": None, "tls-no-cert": bare}
    for mode in ("STRICT", "PERMISSIVE", "DISABLE"):
        for kind, ctx in clients.items():
            if mode == "DISABLE" and kind != "plain":
                continue
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            ls.setblocking(False)
            port = ls.getsockname()[1]
            got: dict[str, object] = {}

            async def server(ls: socket.socket = ls, mode: str = mode, got: dict = got) -> None:
                s, _ = await loop.sock_accept(ls)
                try:
                    _, proto, reason = await accept_inbound(loop, s, Echo, mode, store, 5)
                    got["reason"], got["peer"] = reason, proto.peer  # type: ignore[attr-defined]
                except InboundRefused as exc:
                    got["reason"], got["peer"] = f"refused: {exc}", None

            task = asyncio.create_task(server())
            reply = b""
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5
                )
                w.write(b"hi")
                await w.drain()
                reply = await asyncio.wait_for(r.read(100), 5)
                w.close()
            except (ssl.SSLError, ConnectionError):
                pass
            await asyncio.wait_for(task, 5)
            ls.close()
            results.append((f"{mode}/{kind}", str(got["reason"]), got["peer"], reply))  # type: ignore[arg-type]
    return results


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_accept_inbound_modes(ca: CertificateAuthority, loop_kind: str) -> None:
    import uvloop

    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    res = {k: (reason, peer, reply) for k, reason, peer, reply in run(_accept_scenarios(ca))}
    assert res["STRICT/mtls"] == ("mTLS", CLIENT_ID, b"echo:hi")
    assert (
        res["STRICT/plain"][0]
        == "refused: plaintext connection refused: PeerAuthentication mode is STRICT"
    )
    assert res["STRICT/plain"][2] == b""
    assert res["STRICT/tls-no-cert"][0].startswith("refused: client presented no certificate")
    assert res["PERMISSIVE/mtls"] == ("mTLS", CLIENT_ID, b"echo:hi")
    assert res["PERMISSIVE/plain"] == ("plaintext (PERMISSIVE)", None, b"echo:hi")
    assert res["PERMISSIVE/tls-no-cert"][0].startswith("refused: client presented no certificate")
    assert res["DISABLE/plain"] == ("mTLS disabled", None, b"echo:hi")


async def test_upstream_istio_mutual_and_simple(ca: CertificateAuthority, tmp_path) -> None:
    from diktyo.proxy.network.tls import upstream_context, verify_upstream
    from diktyo.snapshot.model import TlsSettings

    store = CertificateStore()
    store.update(*creds(ca, CLIENT_ID))
    assert upstream_context(None, store) is None
    assert upstream_context(TlsSettings(mode="DISABLE"), store) is None
    mutual = TlsSettings(mode="ISTIO_MUTUAL")
    srv = Server(server_context(*creds(ca, SERVER_ID)))
    async with srv as port:
        _, sslobj = await talk(port, upstream_context(mutual, store))  # type: ignore[arg-type]
    assert verify_upstream(sslobj, mutual, SERVER_ID)[0]
    ok, reason = verify_upstream(sslobj, mutual, "spiffe://cluster.local/ns/default/sa/ratings")
    assert not ok and "is not one of the expected" in reason
    pinned = TlsSettings(
        mode="ISTIO_MUTUAL", subject_alt_names=("spiffe://cluster.local/ns/default/sa/other",)
    )
    assert not verify_upstream(sslobj, pinned, SERVER_ID)[0]  # DestinationRule SANs win

    (tmp_path / "ca.pem").write_text(ca.trust_bundle_pem())
    simple = TlsSettings(
        mode="SIMPLE", ca_certificates=str(tmp_path / "ca.pem"), subject_alt_names=(SERVER_ID,)
    )
    srv = Server(server_context(*creds(ca, SERVER_ID), require_client_cert=False))
    async with srv as port:
        _, sslobj = await talk(port, upstream_context(simple, store))  # type: ignore[arg-type]
    assert verify_upstream(sslobj, simple) == (True, "subjectAltNames matched")
    wrong = TlsSettings(
        mode="SIMPLE",
        ca_certificates=str(tmp_path / "ca.pem"),
        subject_alt_names=("api.example.com",),
    )
    ok, reason = verify_upstream(sslobj, wrong)
    assert not ok and "match none of subjectAltNames" in reason
    with pytest.raises(TlsConfigError, match="MUTUAL needs clientCertificate"):
        upstream_context(TlsSettings(mode="MUTUAL"), store)
    with pytest.raises(TlsConfigError, match="cannot build upstream TLS context"):
        upstream_context(
            TlsSettings(mode="SIMPLE", ca_certificates=str(tmp_path / "missing.pem")), store
        )

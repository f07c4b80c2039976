"""Outbound TLS per DestinationRule (``open_upstream``): SIMPLE / MUTUAL to a real TLS server, auto mTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from diktyo.proxy.network.tls import CertificateStore
from diktyo.proxy.network.upstream import effective_tls, open_upstream
from diktyo.snapshot.model import Endpoint, TlsSettings


def _cert(
    subject: str, issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Certificate | None = None, ca: bool = False, dns: str = "",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, b.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> None:
    data = cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(data)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca_key, ca = _cert("test ca", ca=True)
    srv_key, srv = _cert("ext.example", ca_key, ca, dns="ext.example")
    cli_key, cli = _cert("client", ca_key, ca)
    _other_key, other = _cert("other ca", ca=True)
    files = {
        "ca": tmp_path / "ca.pem",
        "other": tmp_path / "other.pem",
        "server": tmp_path / "server.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client-key.pem",
    }
    _write(files["ca"], None, ca)
    _write(files["other"], None, other)
    _write(files["server"], srv_key, srv)
    _write(files["client_cert"], None, cli)
    files["client_key"].write_bytes(
        cli_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {k: str(v) for k, v in files.items()}


async def _tls_server(pki: dict[str, str], require_client: bool) -> tuple[asyncio.Server, int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"])
    if require_client:
        ctx.load_verify_locations(pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hi")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def _read_via(port: int, tls: TlsSettings) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if not got.done():
                got.set_result(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if not got.done():
                got.set_exception(ConnectionError("closed"))

    transport, _ = await open_upstream(loop, "127.0.0.1", port, tls, P)
    try:
        return await asyncio.wait_for(got, 5)
    finally:
        transport.close()


async def test_simple_tls_verifies_the_server_against_ca_certificates(pki: dict[str, str]) -> None:
    server, port = await _tls_server(pki, require_client=False)
    async with server:
        ok = TlsSettings(mode="SIMPLE", sni="ext.example", ca_certificates=pki["ca"])
        assert await _read_via(port, ok) == b"hi"
        wrong_ca = TlsSettings(mode="SIMPLE", sni="ext.example", ca_certificates=pki["other"])
        with pytest.raises(ConnectionError, match="not signed by a root in our trust bundle"):
            await _read_via(port, wrong_ca)
        wrong_name = TlsSettings(mode="SIMPLE", sni="other.example", ca_certificates=pki["ca"])
        with pytest.raises(ConnectionError):
            await _read_via(port, wrong_name)
        san = TlsSettings(
            mode="SIMPLE", ca_certificates=pki["ca"], subject_alt_names=("nope.example",)
        )
        with pytest.raises(ConnectionError, match="match none of subjectAltNames"):
            await _read_via(port, san)


async def test_mutual_tls_presents_the_files_of_the_destination_rule(pki: dict[str, str]) -> None:
    server, port = await _tls_server(pki, require_client=True)
    async with server:
        mutual = TlsSettings(
            mode="MUTUAL",
            sni="ext.example",
            ca_certificates=pki["ca"],
            client_certificate=pki["client_cert"],
            private_key=pki["client_key"],
        )
        assert await _read_via(port, mutual) == b"hi"
        no_key = TlsSettings(mode="MUTUAL", sni="ext.example", ca_certificates=pki["ca"])
        with pytest.raises(ConnectionError, match="needs clientCertificate and privateKey"):
            await _read_via(port, no_key)


def test_auto_mtls_only_for_endpoints_with_a_sidecar() -> None:
    store = CertificateStore()
    mesh_ep = Endpoint(
        address="127.0.0.1", port=1, has_sidecar=True, principal="spiffe://x/ns/a/sa/b"
    )
    plain_ep = Endpoint(address="127.0.0.1", port=1)
    assert effective_tls(None, mesh_ep, store) is None  # no certificate yet: plaintext
    assert effective_tls(None, mesh_ep, None) is None  # standalone sidecar: plaintext
    store._bundle = object()  # type: ignore[assignment]  # "ready"
    assert effective_tls(None, mesh_ep, store).mode == "ISTIO_MUTUAL"  # type: ignore[union-attr]
    assert effective_tls(None, plain_ep, store) is None
    assert effective_tls(TlsSettings(mode="DISABLE"), mesh_ep, store) is None
    simple = TlsSettings(mode="SIMPLE")
    assert effective_tls(simple, plain_ep, store) is simple

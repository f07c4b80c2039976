"""A cluster's pooled connections are drained when its TLS or pool settings change (Envoy
drains a cluster's pools on a cluster update): a new ``subjectAltNames`` pin applies to the very
next request instead of riding on the old mTLS/TLS connections."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from diktyo.testing import FakeUpstream, HttpClient, eventually, http_snapshot, start_sidecar
from diktyo.testing.fake_upstream import Response


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
          issuer: x509.Name | None = None, ca: bool = False) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("reviews"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return b.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


async def _tls_upstream(tmp: Path) -> tuple[asyncio.AbstractServer, int, list[int], Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("reviews", key, ca_key, issuer=ca.subject)
    (tmp / "ca.pem").write_bytes(_pem(ca))
    (tmp / "server.pem").write_bytes(
        _pem(cert)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "server.pem")
    conns: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(len(conns) + 1)
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], conns, tmp / "ca.pem"


def _tls_snapshot(port: int, ca: Path, san: str, version: str):
    tls = {"mode": "SIMPLE", "ca_certificates": str(ca), "subject_alt_names": [san]}
    return http_snapshot(
        {"reviews": [("127.0.0.1", port)]}, clusters={"reviews": {"tls": tls}}, version=version
    )


async def test_new_subject_alt_names_pin_applies_to_the_next_request(tmp_path: Path) -> None:
    server, port, conns, ca = await _tls_upstream(tmp_path)
    try:
        async with start_sidecar(_tls_snapshot(port, ca, "reviews", "1")) as sc:
            async with HttpClient(sc.port()) as c:
                assert (await c.get("http://reviews/")).status == 200
                assert (await c.get("http://reviews/")).status == 200
            assert len(conns) == 1  # one pooled TLS connection, reused
            # a pin no replica satisfies: the pooled connection must not carry on
            sc.sidecar.apply(_tls_snapshot(port, ca, "spiffe-nobody", "2"))
            async with HttpClient(sc.port()) as c:
                r = await c.get("http://reviews/")
                assert r.status == 503, (r.status, r.body)
                assert r.header("x-envoy-upstream-service-time") is None
            pool = sc.sidecar.pools["outbound|80||reviews"]
            assert pool.active == set() or all(x.stale for x in pool.active)
            # a pin that holds again: a fresh handshake, served
            sc.sidecar.apply(_tls_snapshot(port, ca, "reviews", "3"))
            async with HttpClient(sc.port()) as c:
                assert (await c.get("http://reviews/")).status == 200
    finally:
        server.close()


def _pool_snapshot(port: int, version: str, **pool: object):
    return http_snapshot(
        {"reviews": [("127.0.0.1", port)]},
        clusters={"reviews": {"pool": pool}} if pool else None,
        version=version,
    )


async def test_pool_settings_change_drains_idle_and_busy_connections() -> None:
    async with FakeUpstream() as up, start_sidecar(_pool_snapshot(up.port, "1")) as sc:
        async with HttpClient(sc.port()) as c:
            assert (await c.get("http://reviews/a")).status == 200
            assert (await c.get("http://reviews/b")).status == 200
        assert {q.conn_id for q in up.requests} == {1}
        # an unrelated re-push (same cluster settings) keeps the pooled connection
        sc.sidecar.apply(_pool_snapshot(up.port, "2"))
        async with HttpClient(sc.port()) as c:
            assert (await c.get("http://reviews/c")).status == 200
        assert up.requests[-1].conn_id == 1
        # a busy connection when the settings change: its request finishes, then it closes
        up.handler = lambda req: Response(body=b"slow", delay=0.5 if req.path == "/slow" else 0)
        async with HttpClient(sc.port()) as slow_client:
            slow = asyncio.ensure_future(slow_client.get("http://reviews/slow"))
            await eventually(
                lambda: up.requests[-1].path == "/slow", timeout=10, what="/slow at the upstream"
            )
            sc.sidecar.apply(_pool_snapshot(up.port, "3", idle_timeout=120.0))
            assert (await slow).status == 200
        async with HttpClient(sc.port()) as c:
            assert (await c.get("http://reviews/d")).status == 200
        by_path = {q.path: q.conn_id for q in up.requests}
        assert by_path["/slow"] == 1
        assert by_path["/d"] != 1
        cluster = sc.sidecar.stats.cluster.get("outbound|80||reviews", {})
        assert cluster.get("upstream_cx_pool_drained", 0) >= 1

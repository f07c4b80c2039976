"""The CA: SPIFFE certificates from CSRs, bootstrap tokens, root rotation, the HTTP route."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from diktyo.control.ca import (
    BootstrapTokens,
    CaError,
    CaService,
    CertificateAuthority,
    TokenError,
    renew_at,
)
from diktyo.control.ca.server import ca_routes
from diktyo.core.clock import ManualClock, make_random
from diktyo.proxy.network.tls import client_context, peer_spiffe_id, server_context
from diktyo.security.certs import load_certs, spiffe_id_of
from diktyo.security.csr import make_key_and_csr
from diktyo.security.http_client import request

SID = "spiffe://cluster.local/ns/default/sa/reviews"
OTHER = "spiffe://cluster.local/ns/default/sa/ratings"


@pytest.fixture
def clock() -> ManualClock:
    import time

    return ManualClock(start=0.0, wall=time.time())


@pytest.fixture
def ca(clock: ManualClock) -> CertificateAuthority:
    return CertificateAuthority.generate(clock=clock)


def test_issued_certificate(ca: CertificateAuthority, tmp_path) -> None:
    kc = make_key_and_csr(SID)
    issued = ca.sign_csr(kc.csr_pem, SID)
    leaf, root = load_certs(issued.cert_chain_pem)
    assert spiffe_id_of(leaf) == SID
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"
    leaf.verify_directly_issued_by(root)
    assert root == ca.root_cert
    assert issued.not_after - issued.not_before == pytest.approx(24 * 3600 + 60)
    # OpenSSL agrees the chain verifies
    (tmp_path / "root.pem").write_text(issued.trust_bundle_pem)
    (tmp_path / "leaf.pem").write_text(
        issued.cert_chain_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 0 and ": OK" in out.stdout


def test_csr_for_another_identity_refused(ca: CertificateAuthority) -> None:
    kc = make_key_and_csr(OTHER)
    with pytest.raises(CaError, match="asks for spiffe://cluster.local/ns/default/sa/ratings"):
        ca.sign_csr(kc.csr_pem, SID)


def test_bad_inputs(ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="not a PEM certificate signing request"):
        ca.sign_csr("garbage", SID)
    with pytest.raises(CaError, match="trust domain 'other.td'"):
        ca.sign_csr(
            make_key_and_csr("spiffe://other.td/ns/a/sa/b").csr_pem, "spiffe://other.td/ns/a/sa/b"
        )


def test_tokens(clock: ManualClock) -> None:
    tokens = BootstrapTokens(b"k" * 32, clock)
    t = tokens.issue(SID, ttl=60)
    assert tokens.verify(t) == SID
    with pytest.raises(TokenError, match="signature does not verify"):
        BootstrapTokens(b"x" * 32, clock).verify(t)
    head, body, sig = t.split(".")
    forged_body = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    with pytest.raises(TokenError):
        tokens.verify(f"{head}.{forged_body}.{sig}")
    with pytest.raises(TokenError, match="malformed"):
        tokens.verify("nope")
    clock.advance(61)
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(t)


def test_service_requires_token_bound_to_identity(
    ca: CertificateAuthority, clock: ManualClock
) -> None:
    tokens = BootstrapTokens(clock=clock)
    svc = CaService(ca, tokens)
    kc = make_key_and_csr(SID)
    status, body = svc.handle({"csr": kc.csr_pem})
    assert status == 401 and "bootstrap token required" in body["error"]
    status, body = svc.handle({"csr": kc.csr_pem, "token": "v1.x.y"})
    assert status == 401
    status, body = svc.handle({"csr": kc.csr_pem, "token": tokens.issue(OTHER)})
    assert status == 403 and "asks for" in body["error"]
    status, body = svc.handle({"csr": kc.csr_pem}, authorization=f"Bearer {tokens.issue(SID)}")
    assert status == 200 and body["spiffe_id"] == SID
    assert spiffe_id_of(load_certs(body["cert_chain"])[0]) == SID
    # a CSR without SAN gets the token's identity
    status, body = svc.handle({"csr": _csr_without_san(), "token": tokens.issue(OTHER)})
    assert status == 200 and body["spiffe_id"] == OTHER
    assert svc.issued == 2
    assert svc.handle([1, 2])[0] == 400


def _csr_without_san() -> str:
    from cryptography.hazmat.primitives import hashes, serialization

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_renew_at_half_life_with_jitter(ca: CertificateAuthority) -> None:
    _, issued = ca.issue(SID)
    leaf = load_certs(issued.cert_chain_pem)[0]
    start = leaf.not_valid_before_utc.timestamp()
    life = leaf.not_valid_after_utc.timestamp() - start
    rng = make_random(7)
    times = [renew_at(leaf, rng) for _ in range(50)]
    assert all(start + 0.45 * life <= t <= start + 0.55 * life for t in times)
    assert len(set(times)) > 1
    assert renew_at(issued.cert_chain_pem, make_random(7)) == renew_at(leaf, make_random(7))


def test_from_files_roundtrip_and_errors(ca: CertificateAuthority, tmp_path) -> None:
    ca.save(str(tmp_path / "k.pem"), str(tmp_path / "c.pem"))
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    again = CertificateAuthority.from_files(str(tmp_path / "k.pem"), str(tmp_path / "c.pem"))
    assert again.root_cert == ca.root_cert
    _, issued = again.issue(SID)
    load_certs(issued.cert_chain_pem)[0].verify_directly_issued_by(ca.root_cert)
    with pytest.raises(CaError, match="cannot read CA files"):
        CertificateAuthority.from_files(str(tmp_path / "missing"), str(tmp_path / "c.pem"))
    other = CertificateAuthority.generate()
    other.save(str(tmp_path / "k2.pem"), str(tmp_path / "c2.pem"))
    with pytest.raises(CaError, match="does not belong"):
        CertificateAuthority.from_files(str(tmp_path / "k2.pem"), str(tmp_path / "c.pem"))


async def _handshake(
    server_creds: tuple[str, str, str], client_creds: tuple[str, str, str]
) -> str | None:
    seen: list[str | None] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(peer_spiffe_id(w.get_extra_info("ssl_object")))
        w.write(b"ok")
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(*server_creds))
    port = srv.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_context(*client_creds)), 5
        )
        peer = peer_spiffe_id(w.get_extra_info("ssl_object"))
        assert await asyncio.wait_for(r.read(), 5) == b"ok"
        w.close()
        return peer
    finally:
        srv.close()
        await srv.wait_closed()


async def test_root_rotation_overlap_trusts_both_roots(
    ca: CertificateAuthority, clock: ManualClock
) -> None:
    old_key, old = ca.issue(SID)
    old_root = ca.root_cert
    ca.rotate_root(overlap=3600)
    assert ca.root_cert != old_root
    new_key, new = ca.issue(OTHER)
    load_certs(new.cert_chain_pem)[0].verify_directly_issued_by(ca.root_cert)
    bundle = ca.trust_bundle_pem()
    assert len(load_certs(bundle)) == 2
    # a workload still on the old root and one already on the new root talk both ways
    a = (old.cert_chain_pem, old_key, bundle)
    b = (new.cert_chain_pem, new_key, bundle)
    assert await _handshake(a, b) == SID
    assert await _handshake(b, a) == OTHER
    clock.advance(3601)
    assert load_certs(ca.trust_bundle_pem()) == [ca.root_cert]


async def test_http_route_end_to_end(ca: CertificateAuthority, clock: ManualClock) -> None:
    tokens = BootstrapTokens(clock=clock)
    app = web.Application()
    app.add_routes(ca_routes(CaService(ca, tokens)))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/certificates"
        kc = make_key_and_csr(SID)  # sidecar side: the key stays here
        body = json.dumps({"csr": kc.csr_pem, "token": tokens.issue(SID)}).encode()
        resp = await request("POST", url, body, {"Content-Type": "application/json"})
        assert resp.status == 200
        out = resp.json()
        assert spiffe_id_of(load_certs(out["cert_chain"])[0]) == SID
        assert "PRIVATE KEY" not in resp.body.decode()
        client_context(out["cert_chain"], kc.key_pem, out["trust_bundle"])  # usable as is
        resp = await request("POST", url, json.dumps({"csr": kc.csr_pem}).encode())
        assert resp.status == 401
        resp = await request("POST", url, b"{not json")
        assert resp.status == 400
    finally:
        await runner.cleanup()


async def test_two_phase_root_rotation_trusts_before_it_signs(
    ca: CertificateAuthority, clock: ManualClock
) -> None:
    old_root = ca.root_cert
    ca.rotate_root(overlap=600, activate_after=300)
    bundle = load_certs(ca.trust_bundle_pem())
    assert len(bundle) == 2 and old_root in bundle  # the new root is announced at once ...
    _, still_old = ca.issue(SID)
    load_certs(still_old.cert_chain_pem)[0].verify_directly_issued_by(old_root)  # ... not used
    assert ca.root_cert == old_root
    clock.advance(301)
    new_root = ca.root_cert
    assert new_root != old_root and new_root in bundle
    _, renewed = ca.issue(SID)
    load_certs(renewed.cert_chain_pem)[0].verify_directly_issued_by(new_root)
    clock.advance(598)  # the old root stays trusted for `overlap` after the activation
    assert len(load_certs(ca.trust_bundle_pem())) == 2
    clock.advance(3)
    assert load_certs(ca.trust_bundle_pem()) == [new_root]

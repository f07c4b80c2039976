"""Sidecar identity: first certificate by bootstrap token, renewals by current certificate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from diktyo.control.ca import BootstrapTokens, CaService, CertificateAuthority
from diktyo.control.ca.server import ca_routes
from diktyo.core.clock import ManualClock, make_random
from diktyo.proxy.network.tls import CertificateStore
from diktyo.security.certs import load_certs, spiffe_id_of
from diktyo.security.identity import (
    CertificateRotator,
    Credentials,
    IdentityError,
    fetch_certificate,
)

SID = "spiffe://cluster.local/ns/default/sa/reviews"


class Ca:
    def __init__(self) -> None:
        self.clock = ManualClock(start=0.0, wall=time.time())
        self.ca = CertificateAuthority.generate(clock=self.clock)
        self.tokens = BootstrapTokens(clock=self.clock)
        self.service = CaService(self.ca, self.tokens)
        self.url = ""


@pytest.fixture
async def ca() -> AsyncIterator[Ca]:
    c = Ca()
    app = web.Application()
    app.add_routes(ca_routes(c.service))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield c
    await runner.cleanup()


async def test_token_then_renewal_with_current_cert(ca: Ca) -> None:
    token = ca.tokens.issue(SID, ttl=60)
    first = await fetch_certificate(ca.url, SID, token=token)
    assert first.spiffe_id == SID and spiffe_id_of(load_certs(first.cert_chain_pem)[0]) == SID
    ca.clock.advance(3600)  # the bootstrap token has expired now
    with pytest.raises(IdentityError, match="bootstrap token expired"):
        await fetch_certificate(ca.url, SID, token=token)
    second = await fetch_certificate(ca.url, SID, current=first)
    assert second.key_pem != first.key_pem and second.cert_chain_pem != first.cert_chain_pem
    assert ca.service.issued == 2


async def test_renewal_refused_for_foreign_or_forged_cert(ca: Ca) -> None:
    other = CertificateAuthority.generate()
    key, issued = other.issue(SID)
    foreign = Credentials(
        issued.cert_chain_pem, key, issued.trust_bundle_pem, SID, issued.not_after
    )
    with pytest.raises(IdentityError, match="not signed by a trusted root"):
        await fetch_certificate(ca.url, SID, current=foreign)
    mine = await fetch_certificate(ca.url, SID, token=ca.tokens.issue(SID))
    stolen_cert_wrong_key = Credentials(mine.cert_chain_pem, key, "", SID, mine.not_after)
    with pytest.raises(IdentityError, match="proof signature does not verify"):
        await fetch_certificate(ca.url, SID, current=stolen_cert_wrong_key)
    ca.clock.advance(2 * 86400)
    with pytest.raises(IdentityError, match="has expired"):
        await fetch_certificate(ca.url, SID, current=mine)


async def test_unreachable_ca_is_readable() -> None:
    with pytest.raises(IdentityError, match="cannot reach the CA"):
        await fetch_certificate("http://127.0.0.1:9", SID, token="x", timeout=2)


async def test_rotator_updates_store_and_schedules_half_life(ca: Ca) -> None:
    store = CertificateStore()
    delays: list[float] = []

    async def fake_sleep(d: float) -> None:
        delays.append(d)
        ca.clock.advance(d)  # virtual time: the CA sees the renewal time arrive
        if len(delays) == 3:
            raise asyncio.CancelledError

    rot = CertificateRotator(
        ca.url,
        SID,
        ca.tokens.issue(SID, ttl=60),
        lambda c: store.update(c.cert_chain_pem, c.key_pem, c.trust_bundle_pem),
        clock=ca.clock,
        rng=make_random(1),
        sleep=fake_sleep,
    )
    with pytest.raises(asyncio.CancelledError):
        await rot.run()
    assert rot.renewals == 3 and store.version == 3 and rot.failures == 0
    assert all(0.45 * 86400 <= d <= 0.56 * 86400 for d in delays)
    assert store.bundle is not None and store.bundle.spiffe_id == SID

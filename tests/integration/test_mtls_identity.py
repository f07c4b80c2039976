"""Workload identity: the control plane's CA issues the sidecar's certificate from a CSR + bootstrap token."""

from __future__ import annotations

import asyncio

from diktyo.control.server import ControlPlane
from diktyo.proxy.main import start_identity
from diktyo.proxy.sidecar import Sidecar
from diktyo.security.certs import load_certs, spiffe_id_of
from diktyo.testing import eventually


async def test_sidecar_gets_spiffe_certificate_from_control_plane() -> None:
    cp = ControlPlane(observability=False)
    url = await cp.start()
    sidecar = Sidecar(asyncio.get_running_loop())
    try:
        token = cp.identity.token_for("default", "bookinfo-ratings")
        assert await start_identity(sidecar, url, token, 10) == ""
        b = sidecar.certs.bundle
        assert b.spiffe_id == "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
        leaf = load_certs(b.cert_chain_pem)[0]
        assert spiffe_id_of(leaf) == b.spiffe_id
        assert "BEGIN CERTIFICATE" in b.trust_bundle_pem
        assert cp.identity.service.issued == 1
        # renews at about half of the 24 h lifetime
        delay = sidecar.rotator.next_renewal_delay()
        assert 0.4 * 86400 < delay < 0.6 * 86400
    finally:
        await sidecar.stop()
        await cp.stop()


async def test_forged_token_is_refused_with_a_readable_error() -> None:
    cp = ControlPlane(observability=False)
    url = await cp.start()
    other = ControlPlane(observability=False)  # another CA: its token is not valid here
    sidecar = Sidecar(asyncio.get_running_loop())
    try:
        token = other.identity.token_for("default", "x")
        err = await start_identity(sidecar, url, token, 1.5)
        assert "no workload certificate for spiffe://cluster.local/ns/default/sa/x" in err
        assert sidecar.rotator.failures >= 1
        assert not sidecar.certs.ready
        err = await start_identity(Sidecar(asyncio.get_running_loop()), url, "garbage", 1)
        assert "malformed bootstrap token" in err
    finally:
        await sidecar.stop()
        await cp.stop()


async def test_sidecar_renews_its_certificate_and_keeps_serving_mtls() -> None:
    from diktyo.control.ca.authority import CLOCK_SKEW

    cp = ControlPlane(observability=False)
    cp.identity.ca.workload_lifetime = CLOCK_SKEW + 4  # renewal due in about 2 s
    url = await cp.start()
    sidecar = Sidecar(asyncio.get_running_loop())
    try:
        token = cp.identity.token_for("default", "reviews")
        assert await start_identity(sidecar, url, token, 10) == ""
        first = sidecar.certs.bundle
        await eventually(lambda: sidecar.rotator.renewals >= 2, timeout=30, what="two renewals")
        assert sidecar.rotator.renewals >= 2
        second = sidecar.certs.bundle
        assert second.cert_chain_pem != first.cert_chain_pem
        assert second.key_pem != first.key_pem  # a fresh key per certificate
        assert second.spiffe_id == first.spiffe_id
        assert sidecar.certs.version >= 2
        assert sidecar.rotator.failures == 0
    finally:
        await sidecar.stop()
        await cp.stop()

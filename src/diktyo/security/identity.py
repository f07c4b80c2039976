"""Sidecar side of identity: get a certificate from the CA and keep renewing it.

``fetch_certificate`` makes a fresh key + CSR (the key never leaves this process), proves who
it is with the bootstrap token (first time) or with the current certificate (renewals) and
returns the new credentials. ``CertificateRotator.run()`` loops: fetch, hand the result to
``on_update`` (e.g. ``CertificateStore.update``), sleep until ``renew_at`` (half the lifetime
with jitter), retry failures with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from diktyo.core.clock import SYSTEM_CLOCK, Clock, make_random
from diktyo.security.certs import load_certs, renew_at
from diktyo.security.csr import make_key_and_csr, sign_proof
from diktyo.security.http_client import HttpClientError, request

log = logging.getLogger(__name__)


class IdentityError(RuntimeError):
    """The CA refused or could not be reached."""


@dataclass(frozen=True, slots=True)
class Credentials:
    cert_chain_pem: str
    key_pem: str
    trust_bundle_pem: str
    spiffe_id: str
    not_after: float


async def fetch_certificate(
    ca_url: str,
    spiffe_id: str,
    *,
    token: str | None = None,
    current: Credentials | None = None,
    timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Credentials:
    """POST a CSR to ``<ca_url>/v1/certificates`` proving identity with ``current`` or ``token``."""
    kc = make_key_and_csr(spiffe_id)
    body: dict[str, str] = {"csr": kc.csr_pem}
    if current is not None:
        body["cert_chain"] = current.cert_chain_pem
        body["proof"] = base64.b64encode(sign_proof(current.key_pem, kc.csr_pem.encode())).decode()
    elif token:
        body["token"] = token
    else:
        raise IdentityError("no bootstrap token and no current certificate: cannot ask the CA")
    url = ca_url.rstrip("/") + "/v1/certificates"
    try:
        resp = await request(
            "POST",
            url,
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
            timeout=timeout,
            ssl_context=ssl_context,
        )
    except HttpClientError as exc:
        raise IdentityError(f"cannot reach the CA: {exc}") from None
    try:
        out = resp.json()
    except ValueError:
        out = {}
    if resp.status != 200:
        raise IdentityError(f"the CA refused ({resp.status}): {out.get('error', resp.body[:200])}")
    leaf = load_certs(out["cert_chain"])[0]
    return Credentials(
        out["cert_chain"],
        kc.key_pem,
        out["trust_bundle"],
        out["spiffe_id"],
        leaf.not_valid_after_utc.timestamp(),
    )


def token_subject(token: str) -> str:
    """The SPIFFE id a bootstrap token is for (read, not verified: the CA verifies it)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise IdentityError("malformed bootstrap token: expected v1.<claims>.<signature>")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        sub = claims["sub"]
    except (ValueError, TypeError, KeyError):
        raise IdentityError("malformed bootstrap token: cannot read its claims") from None
    if not isinstance(sub, str) or not sub.startswith("spiffe://"):
        raise IdentityError("bootstrap token has no spiffe:// subject")
    return sub


class CertificateRotator:
    """Keeps a workload certificate fresh; run ``run()`` under the sidecar's TaskGroup."""

    def __init__(
        self,
        ca_url: str,
        spiffe_id: str,
        token: str,
        on_update: Callable[[Credentials], None],
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.ca_url = ca_url
        self.spiffe_id = spiffe_id
        self.token = token
        self.on_update = on_update
        self.clock = clock
        self.rng = rng or make_random()
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self.current: Credentials | None = None
        self.renewals = 0
        self.failures = 0

    async def refresh(self) -> Credentials:
        cur = self.current
        if cur is not None and cur.not_after <= self.clock.time():
            cur = None  # expired: only the bootstrap token can help now
        # several control-plane replicas (``URL,URL,...``) share one CA: the first that answers
        error: IdentityError | None = None
        for url in [u for u in self.ca_url.split(",") if u]:
            try:
                creds = await fetch_certificate(url, self.spiffe_id, token=self.token, current=cur)
                break
            except IdentityError as exc:
                error = exc
        else:
            raise error or IdentityError("no CA URL")
        self.current = creds
        self.renewals += 1
        self.on_update(creds)
        return creds

    def next_renewal_delay(self) -> float:
        assert self.current is not None
        return max(0.0, renew_at(self.current.cert_chain_pem, self.rng) - self.clock.time())

    async def run(self) -> None:
        backoff = self.min_backoff
        while True:
            try:
                await self.refresh()
                backoff = self.min_backoff
                delay = self.next_renewal_delay()
            except IdentityError as exc:
                self.failures += 1
                log.warning("certificate request failed (retry in %.1fs): %s", backoff, exc)
                delay = backoff * (0.5 + self.rng.random())
                backoff = min(backoff * 2, self.max_backoff)
            await self._sleep(delay)  # type: ignore[misc]

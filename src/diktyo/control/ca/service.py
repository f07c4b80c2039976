"""``POST /v1/certificates`` as a pure function: token + CSR in, cert chain + trust bundle out.

Two ways to prove who you are:

- first issuance: ``{"csr", "token"}`` with a bootstrap token (``BootstrapTokens``);
- renewal: ``{"csr", "cert_chain", "proof"}`` where ``cert_chain`` is the sidecar's current,
  still valid certificate from this CA and ``proof`` is base64 of its key's ECDSA-SHA256
  signature over the new CSR PEM (``diktyo.security.csr.sign_proof``). The bootstrap token
  may have expired by then, as Istio's renewals use the current certificate too.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from diktyo.control.ca.authority import CaError, CertificateAuthority, IssuedCertificate
from diktyo.control.ca.token import BootstrapTokens, TokenError
from diktyo.security.spiffe import SpiffeError


class CaService:
    """Checks the bootstrap token, then signs the CSR for the token's identity.

    In a Kubernetes pod ``token_reviewer`` is set (``diktyo.control.ingest.kubernetes``): a
    token that is not a diktyo bootstrap token is then taken for the pod's projected
    service-account token (audience ``diktyo-ca``) and checked with a TokenReview, which
    gives the SPIFFE id of its namespace and service account, as Istio's CA does with
    Kubernetes JWTs (``handle_async``)."""

    __slots__ = ("ca", "issued", "token_reviewer", "tokens")

    def __init__(self, ca: CertificateAuthority, tokens: BootstrapTokens) -> None:
        self.ca = ca
        self.tokens = tokens
        self.issued = 0
        self.token_reviewer: Callable[[str], Awaitable[str | None]] | None = None

    async def handle_async(
        self, body: Any, authorization: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """``handle``, plus service-account tokens when a ``token_reviewer`` is set: 401 when
        the review refuses the token, 403 when the CSR asks for another identity."""
        reviewer = self.token_reviewer
        if reviewer is None or not isinstance(body, dict) or "proof" in body or "cert_chain" in body:
            return self.handle(body, authorization)
        token = _token(body, authorization)
        if not isinstance(token, str) or not token or token.startswith(BOOTSTRAP_PREFIX):
            return self.handle(body, authorization)
        csr = body.get("csr")
        if not isinstance(csr, str) or "CERTIFICATE REQUEST" not in csr:
            return 400, {"error": 'field "csr" must hold a PEM certificate signing request'}
        identity = await reviewer(token)
        if identity is None:
            return 401, {"error": "token refused: neither a diktyo bootstrap token nor a "
                         "service-account token the API server authenticates for audience "
                         "diktyo-ca (TokenReview; see the control plane's log for why)"}
        return self._sign(csr, identity)

    def handle(self, body: Any, authorization: str | None = None) -> tuple[int, dict[str, Any]]:
        """``body``: ``{"csr": PEM, "token": str?}``; the token may also come as ``Bearer``.

        Returns ``(status, json)``: 200 ``{cert_chain, trust_bundle, spiffe_id, expires_at}``,
        400 for a bad request or CSR, 401 for a missing/invalid token, 403 when the CSR asks
        for another identity than the token's.
        """
        if not isinstance(body, dict):
            return 400, {"error": 'request body must be a JSON object {"csr": PEM, "token": ...}'}
        if "proof" in body or "cert_chain" in body:
            return self._renew(body)
        token = _token(body, authorization)
        if not isinstance(token, str) or not token:
            return 401, {
                "error": 'bootstrap token required (field "token" or Authorization: Bearer)'
            }
        csr = body.get("csr")
        if not isinstance(csr, str) or "CERTIFICATE REQUEST" not in csr:
            return 400, {"error": 'field "csr" must hold a PEM certificate signing request'}
        try:
            identity = self.tokens.verify(token)
        except TokenError as exc:
            return 401, {"error": str(exc)}
        return self._sign(csr, identity)

    def _sign(self, csr: str, identity: str) -> tuple[int, dict[str, Any]]:
        try:
            issued = self.ca.sign_csr(csr, identity)
        except (CaError, SpiffeError) as exc:
            status = 403 if "asks for" in str(exc) else 400
            return status, {"error": str(exc)}
        return self._ok(issued)

    def _renew(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        csr, chain, proof = body.get("csr"), body.get("cert_chain"), body.get("proof")
        if not (isinstance(csr, str) and isinstance(chain, str) and isinstance(proof, str)):
            return 400, {"error": 'renewal needs "csr", "cert_chain" and "proof" (strings)'}
        try:
            identity = self.ca.verify_current(chain, csr.encode(), base64.b64decode(proof))
        except (CaError, ValueError) as exc:
            return 401, {"error": f"renewal refused: {exc}"}
        return self._sign(csr, identity)

    def _ok(self, issued: IssuedCertificate) -> tuple[int, dict[str, Any]]:
        self.issued += 1
        return 200, {
            "cert_chain": issued.cert_chain_pem,
            "trust_bundle": issued.trust_bundle_pem,
            "spiffe_id": issued.spiffe_id,
            "expires_at": issued.not_after,
        }


BOOTSTRAP_PREFIX = "v1."  # diktyo bootstrap tokens (diktyo.control.ca.token); JWTs start "eyJ"


def _token(body: dict[str, Any], authorization: str | None) -> Any:
    token = body.get("token")
    if token is None and authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    return token

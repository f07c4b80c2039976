"""The control plane's identity service: one CA + bootstrap tokens + the HTTP route, per mesh.

``MeshIdentity(trust_domain)`` creates a fresh self-signed root (``CertificateAuthority.generate``),
a bootstrap-token key and the ``POST /v1/certificates`` service. The local platform calls
``token_for(namespace, service_account)`` for each sidecar it starts and hands the token over
in a 0600 file (path in ``DIKTYO_CA_TOKEN_FILE``); the sidecar then asks for its certificate
with a CSR (its key never leaves it).
"""

from __future__ import annotations

from typing import Any

from diktyo.control.ca.authority import CertificateAuthority
from diktyo.control.ca.server import ca_routes
from diktyo.control.ca.service import CaService
from diktyo.control.ca.token import DEFAULT_TOKEN_TTL, BootstrapTokens
from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.security.spiffe import (
    TOKEN_ENV,
    spiffe_uri,
)

__all__ = ["TOKEN_ENV", "MeshIdentity"]


class MeshIdentity:
    """CA, token issuer and route of one control plane."""

    def __init__(
        self,
        trust_domain: str = "cluster.local",
        clock: Clock = SYSTEM_CLOCK,
        ca: CertificateAuthority | None = None,
        token_key: bytes | None = None,
    ) -> None:
        self.trust_domain = trust_domain or "cluster.local"
        self.ca = ca or CertificateAuthority.generate(trust_domain=self.trust_domain, clock=clock)
        # the same key across restarts keeps the sidecars' bootstrap tokens valid
        self.tokens = BootstrapTokens(token_key, clock=clock)
        self.service = CaService(self.ca, self.tokens)

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        return spiffe_uri(self.trust_domain, namespace, service_account or "default")

    def token_for(
        self, namespace: str, service_account: str, ttl: float = DEFAULT_TOKEN_TTL
    ) -> str:
        """A bootstrap token for ``spiffe://<td>/ns/<namespace>/sa/<service_account>``."""
        return self.tokens.issue(self.spiffe_id(namespace, service_account), ttl)

    def routes(self) -> list[Any]:
        return ca_routes(self.service)

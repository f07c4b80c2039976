"""Certificate authority: an EC P-256 root issuing short-lived SPIFFE workload certificates.

- ``authority.CertificateAuthority``: pure x509 (sign CSRs, rotate the root with overlap).
- ``token.BootstrapTokens``: HMAC tokens that bind a sidecar to the identity it may request.
- ``service.CaService``: the request/response core of ``POST /v1/certificates``;
  ``server.ca_routes`` mounts it on aiohttp.
"""

from diktyo.control.ca.authority import CaError, CertificateAuthority, IssuedCertificate
from diktyo.control.ca.service import CaService
from diktyo.control.ca.token import BootstrapTokens, TokenError
from diktyo.security.certs import renew_at

__all__ = [
    "BootstrapTokens",
    "CaError",
    "CaService",
    "CertificateAuthority",
    "IssuedCertificate",
    "TokenError",
    "renew_at",
]

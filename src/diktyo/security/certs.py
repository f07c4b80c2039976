"""Certificate helpers shared by sidecar and CA: PEM parsing, SPIFFE SANs, renewal time."""

from __future__ import annotations

import hashlib
import random

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# Istio renews at half the lifetime (SECRET_GRACE_PERIOD_RATIO=0.5) with a little jitter so
# a fleet started together does not renew together.
RENEW_RATIO = 0.5
RENEW_JITTER = 0.05


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order (leaf first for a chain)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate (chain): {exc}") from None


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The first ``spiffe://`` URI SAN of ``cert``, or None."""
    for uri in uri_sans(cert):
        if uri.startswith("spiffe://"):
            return uri
    return None


def spiffe_id_of_der(der: bytes) -> str | None:
    return spiffe_id_of(x509.load_der_x509_certificate(der))


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lower-case hex (Envoy's XFCC ``Hash``)."""
    return hashlib.sha256(der).hexdigest()


def renew_at(
    cert: x509.Certificate | str | bytes,
    rng: random.Random,
    ratio: float = RENEW_RATIO,
    jitter: float = RENEW_JITTER,
) -> float:
    """Unix time at which to renew ``cert``: ``ratio`` of its lifetime, +/- ``jitter`` of it."""
    if not isinstance(cert, x509.Certificate):
        cert = load_certs(cert)[0]
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    life = end - start
    frac = ratio + rng.uniform(-jitter, jitter)
    return start + life * min(max(frac, 0.0), 1.0)

"""Sidecar side of certificate issuance: a fresh EC P-256 key and a CSR for our SPIFFE id.

The private key never leaves the sidecar; only the CSR goes to the CA.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True, slots=True)
class KeyAndCsr:
    key_pem: str  # PKCS#8, unencrypted: keep in memory only
    csr_pem: str


def make_key_and_csr(spiffe_id: str) -> KeyAndCsr:
    """A new P-256 key and a CSR carrying ``spiffe_id`` as URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diktyo")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return KeyAndCsr(key_pem, csr.public_bytes(serialization.Encoding.PEM).decode())


def sign_proof(key_pem: str, message: bytes) -> bytes:
    """ECDSA-SHA256 signature of ``message`` with the current key (renewal proof)."""
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("the workload key is not an EC key")
    return key.sign(message, ec.ECDSA(hashes.SHA256()))

"""The CA core: an EC P-256 root signing workload CSRs with a SPIFFE URI SAN (pure x509).

Theory of operation
-------------------
The CA holds one *current* root (key + self-signed cert) and, after a rotation, the previous
roots together with the time until which they stay trusted (the overlap period). New
certificates are always signed by the current root; the *trust bundle* handed to every
sidecar holds the current root plus every previous root still inside its overlap, so
certificates signed by either root verify during the rollover. Time comes from the injected
clock (``clock.time()``), so tests can issue certificates in the past or future.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.security.certs import cert_pem, load_certs, spiffe_id_of
from diktyo.security.csr import make_key_and_csr
from diktyo.security.spiffe import SpiffeId

DEFAULT_WORKLOAD_LIFETIME = 24 * 3600.0  # Istio: 24 h
DEFAULT_ROOT_LIFETIME = 10 * 365 * 24 * 3600.0  # Istio self-signed root: 10 years
CLOCK_SKEW = 60.0  # not_before is backdated by this much


class CaError(ValueError):
    """A request the CA refuses (bad CSR, identity mismatch, unreadable key files)."""


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    cert_chain_pem: str  # leaf first, then the signing root
    trust_bundle_pem: str  # every root to trust now
    spiffe_id: str
    not_before: float  # unix time
    not_after: float


@dataclass(slots=True)
class _Root:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    trusted_until: float | None = None  # None: current root
    active_from: float = 0.0  # signs from this time on; before it, it is only trusted


def _ts(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


def _make_root(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: float, lifetime: float
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"diktyo root CA {int(now)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ts(now - CLOCK_SKEW))
        .not_valid_after(_ts(now + lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


@dataclass(slots=True)
class CertificateAuthority:
    """Signs workload certificates. Build with ``generate()`` or ``from_files()``."""

    trust_domain: str = "cluster.local"
    clock: Clock = SYSTEM_CLOCK
    workload_lifetime: float = DEFAULT_WORKLOAD_LIFETIME
    root_lifetime: float = DEFAULT_ROOT_LIFETIME
    _roots: list[_Root] = field(default_factory=list)  # [0] is current

    # ------------------------------------------------------------------ construction

    @classmethod
    def generate(
        cls,
        *,
        trust_domain: str = "cluster.local",
        clock: Clock = SYSTEM_CLOCK,
        workload_lifetime: float = DEFAULT_WORKLOAD_LIFETIME,
        root_lifetime: float = DEFAULT_ROOT_LIFETIME,
    ) -> CertificateAuthority:
        """A CA with a fresh self-signed EC P-256 root."""
        ca = cls(trust_domain, clock, workload_lifetime, root_lifetime)
        key = ec.generate_private_key(ec.SECP256R1())
        ca._roots.append(_Root(key, _make_root(key, trust_domain, clock.time(), root_lifetime)))
        return ca

    @classmethod
    def from_pem(
        cls,
        key_pem: str | bytes,
        cert_pem_: str | bytes,
        *,
        trust_domain: str = "cluster.local",
        clock: Clock = SYSTEM_CLOCK,
        workload_lifetime: float = DEFAULT_WORKLOAD_LIFETIME,
    ) -> CertificateAuthority:
        """A CA from a user-provided EC root key and certificate (PEM)."""
        key_b = key_pem.encode() if isinstance(key_pem, str) else key_pem
        try:
            key = serialization.load_pem_private_key(key_b, password=None)
        except (ValueError, TypeError) as exc:
            raise CaError(
                f"cannot read the CA private key: {exc}; give an unencrypted PEM key"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(
                f"the CA key is {type(key).__name__}, diktyo needs an EC key "
                "(openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem)"
            )
        try:
            cert = load_certs(cert_pem_)[0]
        except (ValueError, IndexError) as exc:
            raise CaError(f"cannot read the CA certificate: {exc}") from None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise CaError(
                "the CA certificate does not belong to the CA private key: give a matching pair"
            )
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CaError(
                "the CA certificate is not a CA certificate (basicConstraints CA:TRUE is missing)"
            )
        ca = cls(trust_domain, clock, workload_lifetime)
        ca._roots.append(_Root(key, cert))
        return ca

    @classmethod
    def from_files(cls, key_path: str, cert_path: str, **kwargs: object) -> CertificateAuthority:
        """A CA from ``key_path`` / ``cert_path`` (PEM files), e.g. your own offline root."""
        try:
            with open(key_path, "rb") as f:
                key_pem = f.read()
            with open(cert_path, "rb") as f:
                crt = f.read()
        except OSError as exc:
            raise CaError(f"cannot read CA files: {exc}") from None
        return cls.from_pem(key_pem, crt, **kwargs)  # type: ignore[arg-type]

    def save(self, key_path: str, cert_path: str) -> None:
        """Write the current root key (mode 0600) and certificate as PEM files."""
        root = self._signing_root()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                root.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        with open(cert_path, "w") as f:
            f.write(cert_pem(root.cert))

    # ------------------------------------------------------------------ roots

    def _signing_root(self) -> _Root:
        """The newest root that is active: a root announced by ``rotate_root(activate_after=)``
        is trusted (in the bundle) before it signs anything."""
        now = self.clock.time()
        for r in self._roots:
            if r.active_from <= now:
                return r
        return self._roots[-1]

    @property
    def root_cert(self) -> x509.Certificate:
        return self._signing_root().cert

    @property
    def root_cert_pem(self) -> str:
        return cert_pem(self._signing_root().cert)

    def trust_bundle_pem(self) -> str:
        """Current root plus previous roots still within their overlap period."""
        now = self.clock.time()
        self._roots = [r for r in self._roots if r.trusted_until is None or r.trusted_until > now]
        return "".join(cert_pem(r.cert) for r in self._roots)

    def rotate_root(
        self,
        overlap: float = DEFAULT_WORKLOAD_LIFETIME,
        key_pem: str | bytes | None = None,
        cert_pem_: str | bytes | None = None,
        activate_after: float = 0.0,
    ) -> None:
        """Make a new root current; the old one stays in the bundle for ``overlap`` seconds.

        ``overlap`` should be at least the workload lifetime, so every certificate signed by
        the old root expires before the old root leaves the bundle.

        ``activate_after`` > 0 rotates in two phases, with no failed handshake: the new root
        joins the trust bundle at once (every workload picks it up at its next renewal) and
        starts signing only after ``activate_after`` seconds — at least one renewal period
        (half the workload lifetime), so no workload meets a peer certificate from a root it
        does not trust yet. The old root's overlap counts from the activation.
        """
        now = self.clock.time()
        if key_pem is not None and cert_pem_ is not None:
            new = CertificateAuthority.from_pem(key_pem, cert_pem_, trust_domain=self.trust_domain)
            root = new._roots[0]
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            root = _Root(key, _make_root(key, self.trust_domain, now, self.root_lifetime))
        root.active_from = now + max(0.0, activate_after)
        for r in self._roots:
            if r.trusted_until is None:
                r.trusted_until = root.active_from + overlap
        self._roots.insert(0, root)

    # ------------------------------------------------------------------ issuing

    def sign_csr(
        self, csr_pem: str | bytes, spiffe_id: str, lifetime: float | None = None
    ) -> IssuedCertificate:
        """Sign ``csr_pem`` for ``spiffe_id`` (the identity the caller proved, e.g. by token).

        The CSR may carry URI SANs; if it does they must equal ``spiffe_id``. The certificate
        gets only ``spiffe_id`` as SAN, whatever else the CSR asks for.
        """
        sid = SpiffeId.parse(spiffe_id)
        if sid.trust_domain != self.trust_domain:
            raise CaError(
                f"identity {spiffe_id} is in trust domain {sid.trust_domain!r}, "
                f"this CA signs for {self.trust_domain!r}"
            )
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CaError(f"the CSR is not a PEM certificate signing request: {exc}") from None
        try:
            valid = csr.is_signature_valid
        except InvalidSignature:  # pragma: no cover - cryptography returns False
            valid = False
        if not valid:
            raise CaError("the CSR signature does not verify: it was not made with its own key")
        pub = csr.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < 2048:
                raise CaError(
                    f"RSA key of {pub.key_size} bits is too small; use EC P-256 or RSA >= 2048"
                )
        elif not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CaError(f"unsupported key type {type(pub).__name__}; use EC P-256")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            asked = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            asked = []
        wrong = [u for u in asked if u != sid.uri]
        if wrong:
            raise CaError(f"the CSR asks for {', '.join(wrong)} but the caller is {sid.uri}")
        root = self._signing_root()
        now = self.clock.time()
        life = self.workload_lifetime if lifetime is None else lifetime
        not_before = now - CLOCK_SKEW
        not_after = min(now + life, root.cert.not_valid_after_utc.timestamp())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(root.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_ts(not_before))
            .not_valid_after(_ts(not_after))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                critical=False,
            )
            .sign(root.key, hashes.SHA256())
        )
        return IssuedCertificate(
            cert_chain_pem=cert_pem(cert) + cert_pem(root.cert),
            trust_bundle_pem=self.trust_bundle_pem(),
            spiffe_id=sid.uri,
            not_before=not_before,
            not_after=not_after,
        )

    def verify_current(self, cert_chain_pem: str, message: bytes, signature: bytes) -> str:
        """The SPIFFE id of a still valid certificate from one of our trusted roots whose key
        signed ``message`` (ECDSA-SHA256); ``CaError`` otherwise. Used to authorise renewals.
        """
        try:
            leaf = load_certs(cert_chain_pem)[0]
        except (ValueError, IndexError) as exc:
            raise CaError(f"current certificate unreadable: {exc}") from None
        self.trust_bundle_pem()  # drop roots past their overlap
        for root in self._roots:
            try:
                leaf.verify_directly_issued_by(root.cert)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise CaError("current certificate is not signed by a trusted root of this CA")
        now = self.clock.time()
        if not leaf.not_valid_before_utc.timestamp() <= now <= leaf.not_valid_after_utc.timestamp():
            raise CaError("current certificate has expired: start again with a bootstrap token")
        pub = leaf.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CaError("current certificate has no EC key")
        try:
            pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CaError(
                "proof signature does not verify with the current certificate's key"
            ) from None
        sid = spiffe_id_of(leaf)
        if sid is None:
            raise CaError("current certificate has no SPIFFE id")
        return sid

    def issue(self, spiffe_id: str, lifetime: float | None = None) -> tuple[str, IssuedCertificate]:
        """Key + certificate in one step (local mode, tests): returns ``(key_pem, issued)``."""
        kc = make_key_and_csr(spiffe_id)
        return kc.key_pem, self.sign_csr(kc.csr_pem, spiffe_id, lifetime)

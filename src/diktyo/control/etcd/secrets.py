"""The mesh identity (CA roots + bootstrap-token key) as one sealed blob for the store.

The blob is AES-256-GCM encrypted with a key that never goes into etcd: the store key file
(``--store-key-file``, 32 random bytes as base64, mode 0600) given to every replica. Whoever
reads etcd without it sees only ciphertext. A wrong key fails loudly (GCM authentication),
never silently with another CA.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from diktyo.control.ca.authority import CertificateAuthority, _Root
from diktyo.control.ca.mesh import MeshIdentity
from diktyo.security.certs import cert_pem, load_certs

_AAD = b"diktyo-mesh-identity-v1"


class SealError(ValueError):
    """The sealed identity cannot be opened (wrong key, or damaged)."""


def load_or_create_key(path: str | Path) -> bytes:
    """The 32-byte store key in ``path``; a fresh one is written (0600) if the file is absent."""
    p = Path(path)
    if p.exists():
        raw = base64.b64decode(p.read_text().strip() or "=")
        if len(raw) != 32:
            raise SealError(
                f"{p}: a store key is 32 random bytes as base64 (got {len(raw)} bytes); "
                "create one with: head -c 32 /dev/urandom | base64 > " + str(p)
            )
        return raw
    key = os.urandom(32)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
    return key


def seal(identity: MeshIdentity, key: bytes) -> bytes:
    """The identity's roots and token key, encrypted with ``key``."""
    roots = [
        {
            "key": r.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
            "cert": cert_pem(r.cert),
            "trusted_until": r.trusted_until,
            "active_from": r.active_from,
        }
        for r in identity.ca._roots
    ]
    plain = json.dumps(
        {"roots": roots, "token_key": base64.b64encode(identity.tokens._key).decode()}
    ).encode()
    nonce = os.urandom(12)
    return json.dumps(
        {
            "alg": "AES-256-GCM",
            "nonce": base64.b64encode(nonce).decode(),
            "data": base64.b64encode(AESGCM(key).encrypt(nonce, plain, _AAD)).decode(),
        }
    ).encode()


def unseal(blob: bytes, key: bytes) -> dict[str, Any]:
    try:
        outer = json.loads(blob)
        nonce = base64.b64decode(outer["nonce"])
        plain = AESGCM(key).decrypt(nonce, base64.b64decode(outer["data"]), _AAD)
    except InvalidTag:
        raise SealError(
            "the mesh CA in the store was sealed with another store key: give every replica "
            "the same --store-key-file"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SealError(f"the sealed mesh CA in the store is damaged: {exc}") from None
    return dict(json.loads(plain))


def adopt(identity: MeshIdentity, state: dict[str, Any]) -> None:
    """Make ``identity`` use the unsealed roots and token key, in place (its HTTP route, the
    access policy and the CA service keep their references)."""
    roots = []
    for r in state["roots"]:
        k = serialization.load_pem_private_key(r["key"].encode(), password=None)
        if not isinstance(k, ec.EllipticCurvePrivateKey):
            raise SealError("the stored CA key is not an EC key")
        root = _Root(k, load_certs(r["cert"])[0], r.get("trusted_until"))
        root.active_from = float(r.get("active_from") or 0.0)
        roots.append(root)
    ca: CertificateAuthority = identity.ca
    ca._roots[:] = roots
    identity.tokens._key = base64.b64decode(state["token_key"])


def root_fingerprint(identity: MeshIdentity) -> str:
    """Short id of the current root (logs, ``/v1/replicas``)."""
    der = identity.ca.root_cert.public_bytes(serialization.Encoding.DER)
    import hashlib

    return hashlib.sha256(der).hexdigest()[:16]

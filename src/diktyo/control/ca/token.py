"""Bootstrap tokens: HMAC-signed, identity-bound, short-lived; the CA signs only for their holder.

Format: ``v1.<base64url(JSON {"sub": spiffe-id, "exp": unix-time})>.<base64url(HMAC-SHA256)>``.
The local platform creates one per sidecar (``issue``) and hands it over in a 0600 file; the
CA checks it (``verify``) and signs only for the identity inside it, and the control plane's
API accepts it as the sidecar's proof of identity (``diktyo.control.auth``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.security.spiffe import SpiffeError, SpiffeId

DEFAULT_TOKEN_TTL = 3600.0


class TokenError(ValueError):
    """A bootstrap token that is malformed, forged, expired or for another identity."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class BootstrapTokens:
    """Issue and verify bootstrap tokens with one secret key."""

    __slots__ = ("_clock", "_key")

    def __init__(self, secret: bytes | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._key = secret if secret is not None else os.urandom(32)
        self._clock = clock

    def issue(self, spiffe_id: str, ttl: float = DEFAULT_TOKEN_TTL) -> str:
        sid = SpiffeId.parse(spiffe_id).uri
        body = _b64(
            json.dumps(
                {"sub": sid, "exp": self._clock.time() + ttl}, separators=(",", ":")
            ).encode()
        )
        msg = f"v1.{body}"
        return f"{msg}.{_b64(hmac.new(self._key, msg.encode(), hashlib.sha256).digest())}"

    def verify(self, token: str) -> str:
        """The SPIFFE id the token was issued for; ``TokenError`` if it is not valid now."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise TokenError("malformed bootstrap token: expected v1.<claims>.<signature>")
        msg = f"{parts[0]}.{parts[1]}"
        want = hmac.new(self._key, msg.encode(), hashlib.sha256).digest()
        try:
            got = _unb64(parts[2])
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError):
            raise TokenError("malformed bootstrap token: bad base64 or JSON") from None
        if not hmac.compare_digest(want, got):
            raise TokenError(
                "bootstrap token signature does not verify: it was not issued by this control plane"
            )
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            raise TokenError("malformed bootstrap token: no subject")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp <= self._clock.time():
            raise TokenError("bootstrap token expired: restart the sidecar to get a new one")
        try:
            return SpiffeId.parse(claims["sub"]).uri
        except SpiffeError as exc:
            raise TokenError(str(exc)) from None

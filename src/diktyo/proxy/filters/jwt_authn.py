"""RequestAuthentication enforcement (Envoy's jwt_authn filter as Istio configures it).

Theory of operation
-------------------
``JwtAuthenticator(rules, fetcher, clock)`` is built once per snapshot. For each request:

1. Find a token: each rule's ``fromHeaders`` / ``fromParams`` / ``fromCookies``, or the
   defaults (``Authorization: Bearer <t>`` and the ``access_token`` query parameter).
2. No token -> ``missing``: the request passes without a request principal (Istio requires a
   token only through an AuthorizationPolicy, e.g. ``notRequestPrincipals: ["*"]``).
3. A token -> it must validate against a rule whose issuer equals the token's ``iss`` and
   that looks in the place it was found; else ``failed`` -> 401 with Envoy's message, e.g.
   ``Jwt verification fails``, ``Jwt is expired``, ``Jwt issuer is not configured``.
   The algorithm comes from the JWK (never ``none``), exp/nbf are checked on the injected
   clock with 60 s skew, ``audiences`` (if set) must intersect the token's ``aud``.
4. ``ok`` -> request principal ``iss/sub``, claims for authz, headers to set
   (``outputClaimToHeaders``, ``outputPayloadToHeader``) and headers to remove (the token's
   header unless ``forwardOriginalToken``).

JWKS from ``jwksUri`` are fetched through the injected async ``fetcher(uri) -> bytes`` and
cached for ``jwks_ttl`` seconds; after a failed refresh the stale keys stay in use.
``try_authenticate`` is the synchronous fast path: it returns None only when keys must be
fetched first (then await ``authenticate``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

import jwt

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.snapshot.security import JwtRule

log = logging.getLogger(__name__)

Fetcher = Callable[[str], Awaitable[bytes | str]]

UNAUTHORIZED_STATUS = 401
CLOCK_SKEW = 60.0  # Envoy's default clock_skew_seconds
DEFAULT_JWKS_TTL = 300.0  # Envoy's default remote JWKS cache_duration
DEFAULT_FETCH_TIMEOUT = 5.0
TOKEN_CACHE_SIZE = 256  # verified tokens kept (exp/nbf still checked on every use)
FORBIDDEN_ALGS = frozenset({"none", "None", "NONE", ""})

STATS = ("allowed", "denied", "missing", "jwks_fetch_ok", "jwks_fetch_failed", "jwks_stale_used")

# Envoy's status messages (the response body of a 401)
MSG_VERIFY = "Jwt verification fails"
MSG_EXPIRED = "Jwt is expired"
MSG_NOT_YET = "Jwt not yet valid"
MSG_ISSUER = "Jwt issuer is not configured"
MSG_AUDIENCE = "Audiences in Jwt are not allowed"
MSG_NO_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
MSG_FETCH = "Jwks remote fetch is failed"
MSG_BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature"
MSG_ALG = "Jwt header [alg] is not allowed"


@dataclass(frozen=True, slots=True)
class JwtResult:
    status: Literal["ok", "missing", "failed"]
    principal: str = ""  # "iss/sub"
    claims: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""  # 401 body when failed
    detail: str = ""  # more context for logs
    remove_headers: tuple[str, ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.status != "failed"


@dataclass(frozen=True, slots=True)
class _Location:
    kind: Literal["header", "param", "cookie"]
    name: str  # header names lower-case
    prefix: str = ""


_DEFAULT_LOCATIONS = (
    _Location("header", "authorization", "Bearer "),
    _Location("param", "access_token"),
)


def _locations(rule: JwtRule) -> tuple[_Location, ...]:
    locs = [_Location("header", h.name.lower(), h.prefix) for h in rule.from_headers]
    locs += [_Location("param", p) for p in rule.from_params]
    locs += [_Location("cookie", c) for c in rule.from_cookies]
    return tuple(locs) or _DEFAULT_LOCATIONS


def _parse_jwks(text: str | bytes) -> list[jwt.PyJWK]:
    data = json.loads(text)
    if isinstance(data, dict) and "keys" not in data and "kty" in data:
        data = {"keys": [data]}
    keys = []
    for k in data.get("keys", []):
        try:
            keys.append(jwt.PyJWK(k))
        except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:
            log.warning("skipping unusable JWK %s: %s", k.get("kid", "?"), exc)
    return keys


class _Jwks:
    __slots__ = ("fetched_at", "keys", "lock")

    def __init__(self) -> None:
        self.keys: list[jwt.PyJWK] | None = None
        self.fetched_at = -1e18
        self.lock = asyncio.Lock()


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


class JwtAuthenticator:
    """Validates request JWTs against the RequestAuthentication rules of one workload."""

    __slots__ = (
        "_cache",
        "_clock",
        "_fetcher",
        "_inline",
        "_locs",
        "_remote",
        "_ttl",
        "rules",
        "stats",
    )

    def __init__(
        self,
        rules: tuple[JwtRule, ...] | list[JwtRule],
        fetcher: Fetcher | None = None,
        clock: Clock = SYSTEM_CLOCK,
        jwks_ttl: float = DEFAULT_JWKS_TTL,
    ) -> None:
        self.rules = tuple(rules)
        self._locs = {i: _locations(r) for i, r in enumerate(self.rules)}
        self._inline: dict[int, list[jwt.PyJWK]] = {}
        self._remote: dict[str, _Jwks] = {}
        for i, r in enumerate(self.rules):
            if r.jwks:
                try:
                    self._inline[i] = _parse_jwks(r.jwks)
                except (ValueError, AttributeError, TypeError) as exc:
                    log.warning("RequestAuthentication %s: unusable inline jwks: %s", r.source, exc)
                    self._inline[i] = []
            elif r.jwks_uri:
                self._remote.setdefault(r.jwks_uri, _Jwks())
        self._fetcher = fetcher
        self._clock = clock
        self._ttl = jwks_ttl
        self.stats = dict.fromkeys(STATS, 0)
        # verified tokens -> (rule index, claims): signature checks are the costly part
        self._cache: dict[str, tuple[int, dict[str, Any]]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    # ------------------------------------------------------------------ token lookup

    def _find(self, headers: Mapping[str, str], target: str) -> tuple[str, _Location] | None:
        query: dict[str, str] | None = None
        cookies: dict[str, str] | None = None
        seen: set[_Location] = set()
        for locs in self._locs.values():
            for loc in locs:
                if loc in seen:
                    continue
                seen.add(loc)
                if loc.kind == "header":
                    v = headers.get(loc.name)
                    if v is None:
                        continue
                    if loc.prefix:
                        if not v.lower().startswith(loc.prefix.lower()):
                            continue
                        v = v[len(loc.prefix) :]
                    v = v.strip()
                elif loc.kind == "param":
                    if query is None:
                        q = target.find("?")
                        query = dict(parse_qsl(target[q + 1 :])) if q >= 0 else {}
                    v = query.get(loc.name)
                else:
                    if cookies is None:
                        cookies = {}
                        for part in headers.get("cookie", "").split(";"):
                            k, _, val = part.strip().partition("=")
                            cookies.setdefault(k, val)
                    v = cookies.get(loc.name)
                if v:
                    return v, loc
        return None

    # ------------------------------------------------------------------ validation

    def _fail(self, message: str, detail: str = "") -> JwtResult:
        self.stats["denied"] += 1
        return JwtResult("failed", message=message, detail=detail or message)

    def _candidates(self, iss: str, loc: _Location) -> list[int]:
        return [i for i, r in enumerate(self.rules) if r.issuer == iss and loc in self._locs[i]]

    def _keys_for(self, i: int) -> list[jwt.PyJWK] | None:
        """Keys of rule ``i``; None when a remote JWKS must be fetched first."""
        if i in self._inline:
            return self._inline[i]
        r = self.rules[i]
        if not r.jwks_uri:
            return []
        ent = self._remote[r.jwks_uri]
        if ent.keys is None or self._clock.monotonic() - ent.fetched_at > self._ttl:
            return None
        return ent.keys

    async def _refresh(self, uri: str, timeout: float) -> None:
        ent = self._remote[uri]
        async with ent.lock:
            if ent.keys is not None and self._clock.monotonic() - ent.fetched_at <= self._ttl:
                return
            if self._fetcher is None:
                log.warning("no JWKS fetcher configured, cannot fetch %s", uri)
                self.stats["jwks_fetch_failed"] += 1
                return
            try:
                async with asyncio.timeout(timeout):
                    body = await self._fetcher(uri)
                keys = _parse_jwks(body)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the stale keys
                self.stats["jwks_fetch_failed"] += 1
                log.warning("fetching JWKS %s failed: %s", uri, exc)
                if ent.keys is not None:
                    self.stats["jwks_stale_used"] += 1
                    ent.fetched_at = self._clock.monotonic() - self._ttl + min(self._ttl, 30.0)
                return
            self.stats["jwks_fetch_ok"] += 1
            ent.keys = keys
            self._cache.clear()
            ent.fetched_at = self._clock.monotonic()

    async def prefetch(self) -> None:
        """Fetch every remote JWKS now (sidecar start / snapshot load)."""
        for i, r in enumerate(self.rules):
            if r.jwks_uri and self._keys_for(i) is None:
                await self._refresh(r.jwks_uri, r.timeout or DEFAULT_FETCH_TIMEOUT)

    def _time_check(self, claims: Mapping[str, Any]) -> str:
        now = self._clock.time()
        exp = claims.get("exp")
        if exp is not None and (not isinstance(exp, (int, float)) or now > exp + CLOCK_SKEW):
            return MSG_EXPIRED
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, (int, float)) or now + CLOCK_SKEW < nbf):
            return MSG_NOT_YET
        return ""

    def _cached(self, token: str, loc: _Location) -> JwtResult | None:
        hit = self._cache.get(token)
        if hit is None or loc not in self._locs[hit[0]]:
            return None
        bad = self._time_check(hit[1])
        if bad:
            self._cache.pop(token, None)
            return self._fail(bad)
        return self._success(token, loc, self.rules[hit[0]], hit[1])

    def _verify(
        self, token: str, loc: _Location, idx: list[int], header: dict[str, Any]
    ) -> JwtResult:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg in FORBIDDEN_ALGS:
            return self._fail(MSG_ALG, f"token alg {alg!r} is not allowed")
        kid = header.get("kid")
        last = MSG_NO_KEY
        for i in idx:
            rule = self.rules[i]
            keys = self._keys_for(i)
            if keys is None:
                ent = self._remote.get(rule.jwks_uri)
                keys = ent.keys if ent is not None else None
                if keys is None:
                    last = MSG_FETCH
                    continue
            usable = [
                k
                for k in keys
                if k.algorithm_name == alg and (kid is None or k.key_id in (None, kid))
            ]
            if not usable:
                continue
            claims: dict[str, Any] | None = None
            for k in usable:
                try:
                    claims = jwt.decode(
                        token,
                        key=k.key,
                        algorithms=[alg],
                        options={
                            "verify_signature": True,
                            "verify_exp": False,
                            "verify_nbf": False,
                            "verify_iat": False,
                            "verify_aud": False,
                            "verify_iss": False,
                        },
                    )
                    break
                except jwt.InvalidTokenError:
                    continue
            if claims is None:
                last = MSG_VERIFY
                continue
            bad = self._time_check(claims)
            if bad:
                return self._fail(bad)
            if rule.audiences:
                aud = claims.get("aud")
                auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
                if not set(rule.audiences) & {a for a in auds if isinstance(a, str)}:
                    return self._fail(
                        MSG_AUDIENCE, f"token audiences {auds} not in {list(rule.audiences)}"
                    )
            if len(self._cache) >= TOKEN_CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[token] = (i, claims)
            return self._success(token, loc, rule, claims)
        return self._fail(last)

    def _success(
        self, token: str, loc: _Location, rule: JwtRule, claims: dict[str, Any]
    ) -> JwtResult:
        self.stats["allowed"] += 1
        set_headers: list[tuple[str, str]] = []
        if rule.output_payload_to_header:
            set_headers.append((rule.output_payload_to_header.lower(), token.split(".")[1]))
        for ch in rule.output_claim_to_headers:
            v = claims.get(ch.claim)
            if isinstance(v, bool):
                set_headers.append((ch.header.lower(), "true" if v else "false"))
            elif isinstance(v, (str, int, float)):
                set_headers.append((ch.header.lower(), str(v)))
        remove = () if rule.forward_original_token or loc.kind != "header" else (loc.name,)
        return JwtResult(
            "ok",
            principal=f"{claims.get('iss', '')}/{claims.get('sub', '')}",
            claims=claims,
            remove_headers=remove,
            set_headers=tuple(set_headers),
        )

    def _start(
        self, headers: Mapping[str, str], target: str
    ) -> JwtResult | tuple[str, _Location, list[int], dict[str, Any]]:
        found = self._find(headers, target)
        if found is None:
            self.stats["missing"] += 1
            return JwtResult("missing")
        token, loc = found
        cached = self._cached(token, loc)
        if cached is not None:
            return cached
        parts = token.split(".")
        if len(parts) != 3:
            return self._fail(MSG_BAD_FORMAT)
        try:
            header = _b64json(parts[0])
            payload = _b64json(parts[1])
        except (ValueError, UnicodeDecodeError):
            return self._fail(MSG_BAD_FORMAT, "token header or payload is not base64url JSON")
        if not isinstance(header, dict) or not isinstance(payload, dict):
            return self._fail(MSG_BAD_FORMAT)
        iss = payload.get("iss")
        idx = self._candidates(iss, loc) if isinstance(iss, str) else []
        if not idx:
            return self._fail(
                MSG_ISSUER, f"no jwtRules entry for issuer {iss!r} at {loc.kind} {loc.name}"
            )
        return token, loc, idx, header

    def try_authenticate(self, headers: Mapping[str, str], target: str) -> JwtResult | None:
        """Synchronous check; None when a remote JWKS must be fetched (use ``authenticate``)."""
        st = self._start(headers, target)
        if isinstance(st, JwtResult):
            return st
        token, loc, idx, header = st
        if any(self._keys_for(i) is None for i in idx):
            return None
        return self._verify(token, loc, idx, header)

    async def authenticate(self, headers: Mapping[str, str], target: str) -> JwtResult:
        """Validate the request's token. ``headers``: lower-case names; ``target``: path?query."""
        st = self._start(headers, target)
        if isinstance(st, JwtResult):
            return st
        token, loc, idx, header = st
        for i in idx:
            r = self.rules[i]
            if self._keys_for(i) is None:
                await self._refresh(r.jwks_uri, r.timeout or DEFAULT_FETCH_TIMEOUT)
        return self._verify(token, loc, idx, header)

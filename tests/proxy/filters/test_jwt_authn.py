"""RequestAuthentication: tokens signed with keys generated here, JWKS inline and over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from diktyo.core.clock import ManualClock
from diktyo.proxy.filters.jwt_authn import JwtAuthenticator
from diktyo.security.http_client import fetch_jwks
from diktyo.snapshot.security import ClaimToHeader, JwtHeader, JwtRule

ISS = "testing@secure.istio.io"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_EC = ec.generate_private_key(ec.SECP256R1())


def jwk(key: Any, kid: str) -> dict[str, Any]:
    alg = ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) else RSAAlgorithm
    d = json.loads(alg.to_jwk(key.public_key()))
    d.update(kid=kid, alg="ES256" if alg is ECAlgorithm else "RS256", use="sig")
    return d


JWKS = json.dumps({"keys": [jwk(EC_KEY, "ec1"), jwk(RSA_KEY, "rsa1")]})


def token(
    claims: dict[str, Any] | None = None, key: Any = EC_KEY, alg: str = "ES256", kid: str = "ec1"
) -> str:
    now = time.time()
    base = {"iss": ISS, "sub": "alice", "aud": "bookinfo", "exp": now + 600, "iat": now}
    base.update(claims or {})
    return jwt.encode(
        {k: v for k, v in base.items() if v is not None}, key, algorithm=alg, headers={"kid": kid}
    )


def bearer(t: str) -> dict[str, str]:
    return {"authorization": f"Bearer {t}"}


@pytest.fixture
def authn() -> JwtAuthenticator:
    return JwtAuthenticator([JwtRule(issuer=ISS, jwks=JWKS, audiences=("bookinfo", "other"))])


async def test_valid_token(authn: JwtAuthenticator) -> None:
    r = await authn.authenticate(bearer(token({"groups": ["admins"]})), "/productpage")
    assert r.status == "ok" and r.allowed
    assert r.principal == f"{ISS}/alice"
    assert r.claims["groups"] == ["admins"]
    assert r.remove_headers == ("authorization",)  # token stripped by default
    rsa_tok = token(key=RSA_KEY, alg="RS256", kid="rsa1")
    assert authn.try_authenticate(bearer(rsa_tok), "/").status == "ok"  # type: ignore[union-attr]


async def test_missing_token_passes_without_principal(authn: JwtAuthenticator) -> None:
    r = await authn.authenticate({}, "/")
    assert r.status == "missing" and r.allowed and r.principal == ""


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: token({"exp": time.time() - 3600}), "Jwt is expired"),
        (lambda: token({"nbf": time.time() + 3600}), "Jwt not yet valid"),
        (lambda: token({"aud": "someone-else"}), "Audiences in Jwt are not allowed"),
        (lambda: token({"iss": "https://evil.example"}), "Jwt issuer is not configured"),
        (lambda: token(key=OTHER_EC), "Jwt verification fails"),
        (lambda: token(kid="nope"), "Jwks doesn't have key to match kid or alg from Jwt"),
        (lambda: "not-a-jwt", "Jwt is not in the form of Header.Payload.Signature"),
    ],
)
async def test_invalid_tokens_rejected(authn: JwtAuthenticator, make: Any, message: str) -> None:
    r = await authn.authenticate(bearer(make()), "/")
    assert r.status == "failed" and not r.allowed
    assert r.message == message


async def test_alg_none_rejected(authn: JwtAuthenticator) -> None:
    unsigned = jwt.encode({"iss": ISS, "sub": "mallory", "aud": "bookinfo"}, None, algorithm="none")
    r = await authn.authenticate(bearer(unsigned), "/")
    assert r.status == "failed" and r.message == "Jwt header [alg] is not allowed"


async def test_hs256_with_public_key_as_secret_rejected(authn: JwtAuthenticator) -> None:
    # classic key confusion: HMAC "signed" with the public JWK's bytes, built by hand
    secret = json.dumps(jwk(EC_KEY, "ec1")).encode()
    enc = jwt.utils.base64url_encode
    head = enc(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec1"}).encode())
    body = enc(json.dumps({"iss": ISS, "sub": "mallory", "aud": "bookinfo"}).encode())
    sig = enc(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    r = await authn.authenticate(bearer(b".".join([head, body, sig]).decode()), "/")
    assert r.status == "failed"
    assert r.message == "Jwks doesn't have key to match kid or alg from Jwt"


async def test_bad_signature(authn: JwtAuthenticator) -> None:
    t = token()
    head, _payload, sig = t.split(".")
    tampered = jwt.utils.base64url_encode(
        json.dumps({"iss": ISS, "sub": "root", "aud": "bookinfo"}).encode()
    )
    r = await authn.authenticate(bearer(f"{head}.{tampered.decode()}.{sig}"), "/")
    assert r.message == "Jwt verification fails"


async def test_clock_is_injected() -> None:
    clock = ManualClock(start=0, wall=time.time())
    a = JwtAuthenticator([JwtRule(issuer=ISS, jwks=JWKS)], clock=clock)
    t = token({"exp": time.time() + 100})
    assert (await a.authenticate(bearer(t), "/")).status == "ok"
    clock.advance(100 + 61)  # past exp + 60 s skew; the verified-token cache checks exp too
    assert (await a.authenticate(bearer(t), "/")).message == "Jwt is expired"
    assert (await a.authenticate(bearer(t), "/")).message == "Jwt is expired"


async def test_from_headers_params_and_outputs() -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks=JWKS,
        from_headers=(JwtHeader(name="x-jwt-assertion", prefix="Token "),),
        from_params=("my_token",),
        forward_original_token=True,
        output_claim_to_headers=(
            ClaimToHeader(header="x-jwt-sub", claim="sub"),
            ClaimToHeader(header="x-admin", claim="admin"),
        ),
        output_payload_to_header="x-jwt-payload",
    )
    a = JwtAuthenticator([rule])
    t = token({"admin": True})
    r = await a.authenticate({"x-jwt-assertion": f"Token {t}"}, "/")
    assert r.status == "ok" and r.remove_headers == ()
    assert dict(r.set_headers) == {
        "x-jwt-sub": "alice",
        "x-admin": "true",
        "x-jwt-payload": t.split(".")[1],
    }
    r = await a.authenticate({}, f"/x?a=1&my_token={t}")
    assert r.status == "ok"
    # the default Authorization location is not used when locations are configured
    assert (await a.authenticate(bearer(t), "/")).status == "missing"


async def test_default_access_token_param(authn: JwtAuthenticator) -> None:
    r = await authn.authenticate({}, f"/?access_token={token()}")
    assert r.status == "ok" and r.remove_headers == ()


async def test_remote_jwks_fetched_cached_and_stale_on_failure() -> None:
    served = {"jwks": JWKS, "hits": 0, "fail": False}

    async def jwks(request: web.Request) -> web.Response:
        served["hits"] += 1
        if served["fail"]:
            return web.Response(status=503)
        return web.Response(text=served["jwks"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        clock = ManualClock(start=0, wall=time.time())
        a = JwtAuthenticator(
            [JwtRule(issuer=ISS, jwks_uri=f"http://127.0.0.1:{port}/jwks.json")],
            fetcher=fetch_jwks,
            clock=clock,
            jwks_ttl=300,
        )
        t = token()
        assert a.try_authenticate(bearer(t), "/") is None  # keys not fetched yet
        assert (await a.authenticate(bearer(t), "/")).status == "ok"
        assert a.try_authenticate(bearer(t), "/").status == "ok"  # type: ignore[union-attr]
        assert served["hits"] == 1
        clock.advance(301)
        served["fail"] = True
        # a verified token is cached; a new token needs the (stale) keys
        assert (await a.authenticate(bearer(t), "/")).status == "ok" and served["hits"] == 1
        r = await a.authenticate(bearer(token({"sub": "bob"})), "/")
        assert r.status == "ok" and served["hits"] == 2  # stale keys used after a failed refresh
        assert a.stats["jwks_fetch_failed"] == 1 and a.stats["jwks_stale_used"] == 1
    finally:
        await runner.cleanup()


async def test_remote_jwks_unreachable() -> None:
    a = JwtAuthenticator(
        [JwtRule(issuer=ISS, jwks_uri="http://127.0.0.1:9/jwks.json")], fetcher=fetch_jwks
    )
    r = await a.authenticate(bearer(token()), "/")
    assert r.status == "failed" and r.message == "Jwks remote fetch is failed"


_b64 = st.binary(max_size=60).map(lambda b: jwt.utils.base64url_encode(b).decode())
_json_part = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(
            st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "alg", "kid"]), c, max_size=4
        )
    ),
    max_leaves=8,
).map(lambda v: jwt.utils.base64url_encode(json.dumps(v).encode()).decode())
_tokens = st.one_of(
    st.text(max_size=80),
    st.tuples(_json_part, _json_part, _b64).map(".".join),
    st.tuples(_b64, _b64, _b64).map(".".join),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tok=_tokens, where=st.sampled_from(["header", "param"]))
def test_untrusted_tokens_never_crash(authn: JwtAuthenticator, tok: str, where: str) -> None:
    if where == "header":
        r = authn.try_authenticate({"authorization": "Bearer " + tok}, "/")
    else:
        r = authn.try_authenticate({}, "/?access_token=" + tok)
    assert r is not None and r.status in ("failed", "missing")

"""AuthorizationPolicy semantics, modelled on Istio's HTTP traffic authorization task."""

from __future__ import annotations

import pytest

from diktyo.proxy.filters.authz import DENIED_BODY, AuthzEngine, RequestAttributes
from diktyo.security.pathnorm import normalize_path
from diktyo.snapshot.security import AuthzPolicy, AuthzRule, Condition, Operation, Source

PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
RATINGS = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
ALLOW_NOTHING = AuthzPolicy(name="allow-nothing", namespace="default")  # spec: {}


def req(**kw: object) -> RequestAttributes:
    return RequestAttributes(**kw)  # type: ignore[arg-type]


def test_no_policies_allows() -> None:
    d = AuthzEngine([]).check(req())
    assert d.allowed and "no ALLOW policy" in d.reason
    assert not AuthzEngine([]).enabled


def test_allow_nothing_denies_everything() -> None:
    eng = AuthzEngine([ALLOW_NOTHING])
    for r in (req(), req(method="POST", source_principal=PRODUCTPAGE), req(path="/health")):
        d = eng.check(r)
        assert not d.allowed
        assert d.reason == "no ALLOW policy matched (checked default/allow-nothing)"
    assert DENIED_BODY == b"RBAC: access denied"


def test_allow_all_with_empty_rule() -> None:
    eng = AuthzEngine([AuthzPolicy(name="allow-all", rules=(AuthzRule(),))])
    assert eng.check(req(method="DELETE")).allowed


def test_productpage_viewer_get_only() -> None:
    eng = AuthzEngine(
        [
            ALLOW_NOTHING,
            AuthzPolicy(
                name="productpage-viewer",
                rules=(AuthzRule(operations=(Operation(methods=("GET",)),)),),
            ),
        ]
    )
    ok = eng.check(req(method="GET", path="/productpage"))
    assert ok.allowed and ok.policy == "default/productpage-viewer"
    assert ok.reason == "allowed by ALLOW policy default/productpage-viewer rule 0"
    assert not eng.check(req(method="POST", path="/productpage")).allowed


REVIEWS_VIEWER = AuthzPolicy(
    name="reviews-viewer",
    rules=(
        AuthzRule(
            sources=(Source(principals=("cluster.local/ns/default/sa/bookinfo-productpage",)),),
            operations=(Operation(methods=("GET",)),),
        ),
    ),
)


@pytest.mark.parametrize(
    ("principal", "method", "allowed"),
    [
        (PRODUCTPAGE, "GET", True),
        ("cluster.local/ns/default/sa/bookinfo-productpage", "GET", True),
        (PRODUCTPAGE, "POST", False),
        (RATINGS, "GET", False),
        ("", "GET", False),  # plain text: no principal
        ("spiffe://cluster.local/ns/other/sa/bookinfo-productpage", "GET", False),
    ],
)
def test_reviews_only_from_productpage(principal: str, method: str, allowed: bool) -> None:
    eng = AuthzEngine([ALLOW_NOTHING, REVIEWS_VIEWER])
    assert eng.check(req(source_principal=principal, method=method)).allowed is allowed


def test_deny_wins_over_allow() -> None:
    deny = AuthzPolicy(
        name="deny-delete",
        action="DENY",
        rules=(AuthzRule(operations=(Operation(methods=("DELETE",)),)),),
    )
    allow_all = AuthzPolicy(name="all", rules=(AuthzRule(),))
    eng = AuthzEngine([allow_all, deny])
    d = eng.check(req(method="DELETE"))
    assert not d.allowed and d.policy == "default/deny-delete"
    assert d.reason == "denied by DENY policy default/deny-delete rule 0"
    assert eng.check(req(method="GET")).allowed


def test_deny_without_rules_denies_nothing() -> None:
    assert AuthzEngine([AuthzPolicy(name="d", action="DENY")]).check(req()).allowed


def test_audit_and_custom_do_not_decide() -> None:
    audit = AuthzPolicy(name="audit-get", action="AUDIT", rules=(AuthzRule(),))
    custom = AuthzPolicy(name="ext", action="CUSTOM", provider="opa", rules=(AuthzRule(),))
    eng = AuthzEngine([audit, custom])
    d = eng.check(req())
    assert d.allowed and d.audit == ("default/audit-get",)
    assert not eng.enabled


@pytest.mark.parametrize(
    ("pattern", "path", "match"),
    [
        ("/api/*", "/api/v1/x", True),
        ("/api/*", "/api", False),
        ("*.html", "/index.html", True),
        ("*.html", "/index.htm", False),
        ("*", "/anything", True),
        ("/exact", "/exact", True),
        ("/exact", "/exact/", False),
        ("/exact", "/exact?x=1", True),  # query ignored
        ("/users/{*}/profile", "/users/42/profile", True),
        ("/users/{*}/profile", "/users/42/x/profile", False),
        ("/files/{**}", "/files/a/b/c", True),
    ],
)
def test_path_forms(pattern: str, path: str, match: bool) -> None:
    pol = AuthzPolicy(name="p", rules=(AuthzRule(operations=(Operation(paths=(pattern,)),)),))
    assert AuthzEngine([pol]).check(req(path=path)).allowed is match


@pytest.mark.parametrize(
    "sneaky", ["/public/../admin", "/%2e%2e/admin", "/public/%2E%2E/admin", "/public\\..\\admin"]
)
def test_deny_admin_cannot_be_bypassed_after_normalisation(sneaky: str) -> None:
    deny = AuthzPolicy(
        name="no-admin",
        action="DENY",
        rules=(AuthzRule(operations=(Operation(paths=("/admin*",)),)),),
    )
    eng = AuthzEngine([deny])
    path, _ = normalize_path(sneaky)
    assert not eng.check(req(path=path)).allowed
    assert eng.check(req(path=sneaky)).allowed  # without normalisation it would slip through


def test_not_fields_and_hosts_ports() -> None:
    pol = AuthzPolicy(
        name="p",
        rules=(
            AuthzRule(
                operations=(
                    Operation(
                        hosts=("*.example.com", "reviews"),
                        not_paths=("/private*",),
                        ports=("9080",),
                    ),
                ),
            ),
        ),
    )
    eng = AuthzEngine([pol])
    assert eng.check(req(host="Reviews:9080", port=9080, path="/x")).allowed
    assert eng.check(req(host="api.EXAMPLE.com", port=9080)).allowed
    assert not eng.check(req(host="reviews", port=9080, path="/private/1")).allowed
    assert not eng.check(req(host="ratings", port=9080)).allowed
    assert not eng.check(req(host="reviews", port=9081)).allowed


def test_namespaces_ip_blocks_and_request_principals() -> None:
    pol = AuthzPolicy(
        name="p",
        rules=(
            AuthzRule(sources=(Source(namespaces=("default",), not_ip_blocks=("10.0.0.0/8",)),)),
            AuthzRule(sources=(Source(request_principals=("*",)),)),
        ),
    )
    eng = AuthzEngine([pol])
    assert eng.check(req(source_principal=PRODUCTPAGE, source_ip="127.0.0.1")).allowed
    assert not eng.check(req(source_principal=PRODUCTPAGE, source_ip="10.1.2.3")).allowed
    assert not eng.check(req(source_principal="cluster.local/ns/x/sa/y")).allowed
    d = eng.check(req(request_principal="https://issuer/alice"))
    assert d.allowed and d.reason.endswith("rule 1")


def test_deny_requests_without_jwt() -> None:
    pol = AuthzPolicy(
        name="require-jwt",
        action="DENY",
        rules=(AuthzRule(sources=(Source(not_request_principals=("*",)),)),),
    )
    eng = AuthzEngine([pol])
    assert not eng.check(req()).allowed
    assert eng.check(req(request_principal="iss/sub")).allowed


def test_when_conditions() -> None:
    pol = AuthzPolicy(
        name="p",
        rules=(
            AuthzRule(
                conditions=(
                    Condition(key="request.headers[X-Version]", values=("v1", "v2*")),
                    Condition(key="request.auth.claims[groups]", values=("admins",)),
                    Condition(key="source.ip", not_values=("192.168.0.0/16",)),
                ),
            ),
        ),
    )
    eng = AuthzEngine([pol])
    good = {
        "headers": {"x-version": "v2beta"},
        "claims": {"groups": ["dev", "admins"]},
        "source_ip": "127.0.0.1",
    }
    assert eng.check(req(**good)).allowed
    assert not eng.check(req(**{**good, "headers": {}})).allowed
    assert not eng.check(req(**{**good, "claims": {"groups": "dev"}})).allowed
    assert not eng.check(req(**{**good, "source_ip": "192.168.1.1"})).allowed


def test_nested_claims_and_unknown_key() -> None:
    nested = AuthzPolicy(
        name="n",
        rules=(
            AuthzRule(
                conditions=(Condition(key="request.auth.claims[org][team]", values=("mesh",)),)
            ),
        ),
    )
    assert AuthzEngine([nested]).check(req(claims={"org": {"team": "mesh"}})).allowed
    unknown = AuthzPolicy(
        name="u", rules=(AuthzRule(conditions=(Condition(key="bogus.key", values=("x",)),)),)
    )
    assert not AuthzEngine([unknown]).check(req()).allowed


def test_inbound_security_pipeline() -> None:
    import json
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from diktyo.control.ca import CertificateAuthority
    from diktyo.proxy.filters.authz import InboundSecurity
    from diktyo.security.certs import load_certs
    from diktyo.snapshot.security import JwtRule, SecurityConfig

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "k", "alg": "ES256"}]})
    cfg = SecurityConfig(
        authz=(
            AuthzPolicy(
                name="require-jwt",
                rules=(AuthzRule(sources=(Source(request_principals=("issuer/*",)),)),),
            ),
            AuthzPolicy(
                name="no-admin",
                action="DENY",
                rules=(AuthzRule(operations=(Operation(paths=("/admin*",)),)),),
            ),
        ),
        jwt_rules=(JwtRule(issuer="issuer", jwks=jwks),),
    )
    me = "spiffe://cluster.local/ns/default/sa/reviews"
    sec = InboundSecurity(cfg, local_spiffe_id=me)
    good = jwt.encode(
        {"iss": "issuer", "sub": "alice", "exp": time.time() + 60},
        key,
        "ES256",
        headers={"kid": "k"},
    )
    auth = {"authorization": f"Bearer {good}"}

    v = sec.check("GET", "/x", "reviews:9080", {}, 9080)
    assert v is not None and v.status == 403 and v.body == b"RBAC: access denied"
    assert v.details == "rbac_access_denied_matched_policy[none]"

    v = sec.check("GET", "/x", "reviews", {"authorization": "Bearer a.b.c"}, 9080)
    assert v is not None and v.status == 401
    v = sec.check("GET", "/x", "reviews", {"authorization": "Bearer " + good[:-4] + "AAAA"}, 9080)
    assert v is not None and v.status == 401 and v.body == b"Jwt verification fails"
    assert v.details == "jwt_authn_access_denied{Jwt_verification_fails}"

    ca = CertificateAuthority.generate()
    _, issued = ca.issue(PRODUCTPAGE)
    from cryptography.hazmat.primitives import serialization

    der = load_certs(issued.cert_chain_pem)[0].public_bytes(serialization.Encoding.DER)
    v = sec.check("GET", "/a/./b?q=1", "reviews", auth, 9080, PRODUCTPAGE, "127.0.0.1", der)
    assert v is not None and v.status == 0
    assert v.path == "/a/b?q=1" and v.request_principal == "issuer/alice"
    assert "authorization" in v.remove_headers and "x-forwarded-client-cert" in v.remove_headers
    xfcc = dict(v.set_headers)["x-forwarded-client-cert"]
    assert xfcc.startswith(f"By={me};Hash=") and xfcc.endswith(f";URI={PRODUCTPAGE}")

    v = sec.check("GET", "/public/%2e%2e/admin", "reviews", auth, 9080)
    assert (
        v is not None
        and v.status == 403
        and v.details == "rbac_access_denied_matched_policy[default/no-admin]"
    )
    v = sec.check("GET", "/a%00", "reviews", auth, 9080)
    assert v is not None and v.status == 400


def test_inbound_xfcc_per_peer_certificate() -> None:
    """The XFCC header is built once per peer certificate and reused, yet each request gets
    its own peer's header, including when peers alternate and when a certificate is the same
    bytes in a different object (another connection from the same peer)."""
    from cryptography.hazmat.primitives import serialization

    from diktyo.control.ca import CertificateAuthority
    from diktyo.proxy.filters.authz import InboundSecurity
    from diktyo.proxy.network.tls import xfcc_value
    from diktyo.security.certs import fingerprint, load_certs
    from diktyo.snapshot.security import SecurityConfig

    ca = CertificateAuthority.generate()
    reviews = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    ders = {}
    for sid in (PRODUCTPAGE, reviews):
        _, issued = ca.issue(sid)
        ders[sid] = load_certs(issued.cert_chain_pem)[0].public_bytes(serialization.Encoding.DER)
    me = "spiffe://cluster.local/ns/default/sa/ratings"
    sec = InboundSecurity(SecurityConfig(), local_spiffe_id=me)
    for sid in (PRODUCTPAGE, reviews, reviews, PRODUCTPAGE, reviews):
        der = bytes(bytearray(ders[sid]))  # equal bytes, a new object: as on a new connection
        v = sec.check("GET", "/", "ratings", {}, 9080, sid, "127.0.0.1", der)
        assert v is not None and v.status == 0
        xfcc = dict(v.set_headers)["x-forwarded-client-cert"]
        assert xfcc == f"By={me};Hash={fingerprint(der)};URI={sid}" == xfcc_value(me, der)
        assert v.remove_headers == ("x-forwarded-client-cert",)
    v = sec.check("GET", "/", "ratings", {}, 9080)  # plaintext: none, and a client's is removed
    assert v is not None and v.set_headers == () and "x-forwarded-client-cert" in v.remove_headers

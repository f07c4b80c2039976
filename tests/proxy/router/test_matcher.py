"""Route matcher (sans-I/O): virtual host lookup, first-match-wins, conditions, weights, rewrites."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from diktyo.proxy.router.matcher import RequestInfo, RouteMatcher
from diktyo.snapshot.model import RouteTable


def table(vhosts: list[dict[str, Any]]) -> RouteMatcher:
    return RouteMatcher(msgspec.convert({"name": "t", "virtual_hosts": vhosts}, RouteTable))


def vh(name: str, domains: list[str], routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "domains": domains, "routes": routes}


def route(name: str, *matches: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = {"name": name, "matches": list(matches), "clusters": [{"cluster": "c"}]}
    r.update(kw)
    return r


def info(
    path: str = "/",
    authority: str = "reviews",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> RequestInfo:
    return RequestInfo(method, path, authority, headers or {})


def sel_name(m: RouteMatcher, i: RequestInfo) -> str | None:
    r = m.select(i)
    return None if r is None else r[1].route.name


def test_virtual_host_lookup_order() -> None:
    m = table(
        [
            vh("exact", ["reviews", "reviews:9080"], [route("e")]),
            vh("suffix", ["*.example.com"], [route("s")]),
            vh("longer", ["*.api.example.com"], [route("l")]),
            vh("prefix", ["foo.*"], [route("p")]),
            vh("all", ["*"], [route("a")]),
        ]
    )
    assert sel_name(m, info(authority="reviews")) == "e"
    assert sel_name(m, info(authority="REVIEWS:9080")) == "e"
    assert sel_name(m, info(authority="reviews:1234")) == "e"  # port stripped as fallback
    assert sel_name(m, info(authority="x.example.com")) == "s"
    assert sel_name(m, info(authority="x.api.example.com")) == "l"
    assert sel_name(m, info(authority="foo.bar")) == "p"
    assert sel_name(m, info(authority="other")) == "a"


def test_no_virtual_host_and_no_route() -> None:
    m = table([vh("r", ["reviews"], [route("only", {"uri": {"kind": "exact", "value": "/x"}})])])
    assert m.select(info(authority="ratings")) is None
    assert m.select(info(path="/y")) is None


def test_first_match_wins_and_or_of_blocks() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [
                    route(
                        "jason",
                        {
                            "headers": [
                                {"name": "end-user", "match": {"kind": "exact", "value": "jason"}}
                            ]
                        },
                        {"uri": {"kind": "prefix", "value": "/jason"}},
                    ),
                    route("api", {"uri": {"kind": "prefix", "value": "/api"}}),
                    route("default"),
                ],
            )
        ]
    )
    assert sel_name(m, info(headers={"end-user": "jason"})) == "jason"
    r = m.select(info(path="/jason/1"))
    assert r is not None and r[1].route.name == "jason" and r[2] == 1
    assert sel_name(m, info(path="/api/v1", headers={"end-user": "x"})) == "api"
    assert sel_name(m, info(path="/other")) == "default"


def test_conditions_are_anded() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [
                    route(
                        "both",
                        {
                            "uri": {"kind": "prefix", "value": "/a"},
                            "method": {"kind": "exact", "value": "POST"},
                        },
                    )
                ],
            )
        ]
    )
    assert sel_name(m, info(path="/a", method="POST")) == "both"
    assert m.select(info(path="/a", method="GET")) is None
    assert m.select(info(path="/b", method="POST")) is None


@pytest.mark.parametrize(
    "kind, value, path, ok",
    [
        ("exact", "/a", "/a", True),
        ("exact", "/a", "/a?x=1", True),  # query string is not part of the path match
        ("exact", "/a", "/ab", False),
        ("prefix", "/a", "/abc", True),
        ("prefix", "/b", "/abc", False),
        ("regex", "/v[0-9]+/.*", "/v12/x", True),
        ("regex", "/v[0-9]+", "/v12/x", False),  # full match, like Envoy
    ],
)
def test_uri_kinds(kind: str, value: str, path: str, ok: bool) -> None:
    m = table([vh("r", ["reviews"], [route("x", {"uri": {"kind": kind, "value": value}})])])
    assert (m.select(info(path=path)) is not None) is ok


def test_ignore_uri_case() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [route("x", {"uri": {"kind": "prefix", "value": "/API"}, "ignore_uri_case": True})],
            )
        ]
    )
    assert m.select(info(path="/api/x")) is not None


def test_headers_without_headers_present_and_query() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [
                    route(
                        "present", {"headers": [{"name": "x-canary", "match": {"kind": "present"}}]}
                    ),
                    route(
                        "not-debug",
                        {
                            "without_headers": [{"name": "x-debug", "match": {"kind": "present"}}],
                            "query_params": [
                                {"name": "v", "match": {"kind": "regex", "value": "[0-9]+"}}
                            ],
                        },
                    ),
                    route(
                        "regex-hdr",
                        {
                            "headers": [
                                {
                                    "name": "user-agent",
                                    "match": {"kind": "regex", "value": ".*Firefox.*"},
                                }
                            ]
                        },
                    ),
                ],
            )
        ]
    )
    assert sel_name(m, info(headers={"x-canary": ""})) == "present"
    assert sel_name(m, info(path="/?v=12")) == "not-debug"
    assert m.select(info(path="/?v=12", headers={"x-debug": "1"})) is None
    assert m.select(info(path="/?v=x")) is None
    assert sel_name(m, info(headers={"user-agent": "Mozilla Firefox/1"})) == "regex-hdr"


def test_authority_scheme_and_port() -> None:
    m = table(
        [
            vh(
                "r",
                ["*"],
                [
                    route("port", {"port": 9080}),
                    route("auth", {"authority": {"kind": "prefix", "value": "rev"}}),
                ],
            )
        ]
    )
    assert sel_name(m, info(authority="x:9080")) == "port"
    assert sel_name(m, info(authority="reviews:1")) == "auth"


def test_why_not_names_first_failing_condition() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [
                    route(
                        "x",
                        {
                            "uri": {"kind": "prefix", "value": "/a"},
                            "method": {"kind": "exact", "value": "POST"},
                        },
                    )
                ],
            )
        ]
    )
    cr = m.vhosts[0].routes[0]
    reasons = cr.why_not(info(path="/a", method="GET"))
    assert reasons == ["match[0]: method exact 'POST' did not match"]


def test_weighted_pick_follows_weights_with_seeded_rng() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [
                    {
                        "name": "w",
                        "clusters": [
                            {"cluster": "v1", "weight": 75},
                            {"cluster": "v2", "weight": 25},
                        ],
                    }
                ],
            )
        ]
    )
    cr = m.vhosts[0].routes[0]
    rng = random.Random(7)
    picks = [cr.pick(rng).wc.cluster for _ in range(4000)]  # type: ignore[union-attr]
    share = picks.count("v2") / len(picks)
    assert 0.2 < share < 0.3


def test_rewrite_prefix_exact_and_regex() -> None:
    m = table(
        [
            vh(
                "r",
                ["reviews"],
                [
                    route(
                        "p", {"uri": {"kind": "prefix", "value": "/old"}}, rewrite={"uri": "/new"}
                    ),
                    route(
                        "e",
                        {"uri": {"kind": "exact", "value": "/exact"}},
                        rewrite={"uri": "/replaced"},
                    ),
                    route(
                        "x",
                        {"uri": {"kind": "prefix", "value": "/rx"}},
                        rewrite={"uri_regex": "^/rx/(.*)$", "uri_regex_rewrite": "/v2/\\1"},
                    ),
                ],
            )
        ]
    )
    p, e, x = m.vhosts[0].routes
    assert p.rewrite_path("/old/a?q=1", 0) == "/new/a?q=1"
    assert e.rewrite_path("/exact?z", 0) == "/replaced?z"
    assert x.rewrite_path("/rx/abc", 0) == "/v2/abc"


def test_bad_regex_fails_at_compile_time() -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        table([vh("r", ["reviews"], [route("x", {"uri": {"kind": "regex", "value": "(["}})])])


def test_virtual_host_cache_by_authority_is_bounded_and_consistent() -> None:
    from diktyo.proxy.router import matcher as matcher_mod

    m = table([vh("exact", ["reviews"], [route("e")]), vh("all", ["*"], [route("a")])])
    for _ in range(2):  # the second round is answered from the cache
        assert m.find_virtual_host("REVIEWS:9080") is m.find_virtual_host("reviews")
        assert m.find_virtual_host("other") is not m.find_virtual_host("reviews")
    assert "REVIEWS:9080" in m.by_authority
    for i in range(matcher_mod.MAX_AUTHORITY_CACHE + 10):
        assert m.find_virtual_host(f"h{i}") is m.find_virtual_host("other")
    assert len(m.by_authority) <= matcher_mod.MAX_AUTHORITY_CACHE
    empty = table([vh("exact", ["reviews"], [route("e")])])
    assert empty.find_virtual_host("nope") is None
    assert "nope" not in empty.by_authority


def test_flat_blocks_select_like_route_match() -> None:
    m = table(
        [
            vh(
                "v",
                ["reviews"],
                [
                    route(
                        "canary",
                        {
                            "headers": [
                                {"name": "x-canary", "match": {"kind": "exact", "value": "1"}}
                            ]
                        },
                    ),
                    route(
                        "api",
                        {"uri": {"kind": "prefix", "value": "/api/"}},
                        {"method": {"kind": "exact", "value": "POST"}},
                    ),
                    route("re", {"uri": {"kind": "regex", "value": "/r/[0-9]+"}}),
                    {"name": "all", "matches": [], "clusters": [{"cluster": "c"}]},
                    route("never", {"uri": {"kind": "prefix", "value": "/"}}),
                ],
            )
        ]
    )
    cvh = m.find_virtual_host("reviews")
    assert cvh is not None
    cases = [
        info("/", headers={"x-canary": "1"}),
        info("/api/x"),
        info("/other", method="POST"),
        info("/r/12"),
        info("/r/x"),
        info("/"),
    ]
    for i in cases:
        expected = m.select(i)
        got = None
        for cr, bi, conds in cvh.blocks:
            if all(c(i) for c in conds):
                got = (cr.route.name, bi)
                break
        assert expected is not None and got == (expected[1].route.name, expected[2])
    assert [sel_name(m, i) for i in cases] == [
        "canary",
        "api",
        "api",
        "re",
        "all",
        "all",
    ]


def test_port_match_uses_listener_port_then_authority_then_scheme_default() -> None:
    """Istio: ``match.port`` is the port the request is addressed to; with no port in the
    authority that is the scheme's default (``Host: www.googleapis.com`` is port 80)."""
    m = table([vh("g", ["*"], [route("p80", {"port": 80}), route("p443", {"port": 443})])])

    def at(authority: str, scheme: str = "http", port: int | None = None) -> str | None:
        return sel_name(m, RequestInfo("GET", "/", authority, {}, scheme, port))

    assert at("www.googleapis.com") == "p80"
    assert at("www.googleapis.com", scheme="https") == "p443"
    assert at("www.googleapis.com:443") == "p443"
    assert at("www.googleapis.com:8080") is None
    # a listener standing for a service or gateway server port: that port, whatever Host says
    assert at("www.googleapis.com:18080", port=443) == "p443"
    assert at("www.googleapis.com", port=80, scheme="https") == "p80"

"""simulate(): the real matcher explains which rule matched, why earlier ones did not, and policies."""

from __future__ import annotations

from diktyo.proxy.router.simulate import format_text, simulate
from diktyo.testing import http_snapshot, outbound_cluster

CL = outbound_cluster("reviews")


def snap():  # type: ignore[no-untyped-def]
    return http_snapshot(
        {"reviews": [("127.0.0.1", 9001), ("127.0.0.1", 9002)]},
        routes={
            "reviews": [
                {
                    "name": "jason",
                    "matches": [
                        {
                            "headers": [
                                {"name": "end-user", "match": {"kind": "exact", "value": "jason"}}
                            ]
                        }
                    ],
                    "clusters": [{"cluster": CL, "host": "reviews", "subset": "v2"}],
                    "timeout": 2.0,
                    "source": {"name": "reviews", "rule": 0, "rule_name": "jason"},
                },
                {
                    "name": "default",
                    "clusters": [
                        {"cluster": CL, "host": "reviews", "subset": "v1", "weight": 80},
                        {"cluster": CL, "host": "reviews", "subset": "v3", "weight": 20},
                    ],
                    "retries": {"attempts": 3, "retry_on": ["5xx"]},
                    "fault": {"delay": {"fixed_delay": 1.0, "percentage": 10.0}},
                    "mirrors": [{"cluster": CL, "host": "reviews", "percentage": 5.0}],
                    "source": {"name": "reviews", "rule": 1, "rule_name": "default"},
                },
            ]
        },
    )


def test_matched_rule_and_reasons_for_skipped_rules() -> None:
    res = simulate(snap(), "GET", "http://reviews/x", {"end-user": "bob"})
    assert res["virtualService"] == "default/reviews"
    assert res["rule"]["name"] == "default" and res["rule"]["index"] == 1
    (skipped,) = res["skipped"]
    assert skipped["name"] == "jason"
    assert "end-user" in skipped["reasons"][0] and "did not match" in skipped["reasons"][0]
    assert res["destination"] == {"host": "reviews", "subset": "v1", "port": 80}
    assert [d["weight"] for d in res["destinations"]] == [80.0, 20.0]
    assert len(res["endpoints"]) == 2
    assert res["retries"]["attempts"] == 3 and res["retries"]["default"] is False
    assert res["fault"]["delay"]["fixed_delay"] == 1.0
    assert res["mirror"][0]["percentage"] == 5.0
    assert res["timeout"] is None
    assert "matched rule 1 'default'" in format_text(res)


def test_header_match_and_default_retries() -> None:
    res = simulate(snap(), "GET", "http://reviews:80/x", {"End-User": "jason"})
    assert res["rule"]["name"] == "jason"
    assert res["destination"]["subset"] == "v2"
    assert res["timeout"] == 2.0
    assert res["retries"]["default"] is True and res["retries"]["attempts"] == 2


def test_no_virtual_host() -> None:
    res = simulate(snap(), "GET", "http://ratings/x")
    assert res["rule"] is None and res["result"].startswith("404 NR")


def test_the_default_route_is_named_as_such() -> None:
    s = http_snapshot(
        {"reviews": [("127.0.0.1", 9001)]},
        routes={"reviews": [{"name": "default", "clusters": [{"cluster": CL, "host": "reviews"}]}]},
    )
    res = simulate(s, "GET", "http://reviews/x")
    assert res["rule"]["virtualService"] is None
    text = format_text(res)
    assert "matched the default route of the service (no VirtualService or route)" in text, text
    assert "VirtualService None" not in text

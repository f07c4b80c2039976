"""RE2 on the request path: a backtracking-hostile pattern cannot freeze a real sidecar.

Python's ``re`` takes exponential time on ``(a+)+$`` against ``a*40 + "!"``; the sidecar
must answer at once (RE2 is linear), both for a route header match and for the admin
``/stats?filter=`` regex.
"""

from __future__ import annotations

from urllib.parse import quote

from diktyo.testing import FakeUpstream, http_request, http_snapshot, start_sidecar_process

EVIL = "(a+)+$"
VALUE = "a" * 40 + "!"  # 41 bytes: no match, worst case for a backtracking engine


def _snapshot(port: int):
    return http_snapshot(
        {"reviews": [("127.0.0.1", port)]},
        routes={
            "reviews": [
                {
                    "name": "evil",
                    "matches": [
                        {"headers": [{"name": "x-user", "match": {"kind": "regex", "value": EVIL}}]}
                    ],
                    "direct_response": {"status": 418, "body": "teapot"},
                },
                {"name": "default", "clusters": [{"cluster": "outbound|80||reviews"}]},
            ]
        },
    )


async def test_header_regex_answers_promptly_through_a_real_sidecar() -> None:
    async with FakeUpstream() as up, start_sidecar_process(_snapshot(up.port)) as sc:
        # a value the pattern matches goes to the direct response (full match, as Envoy)
        r = await http_request(sc.port(), "GET", "http://reviews/", {"x-user": "aaaa"})
        assert r.status == 418
        # the hostile value: no match, so the default route; a backtracking engine would
        # hold the sidecar at 100 % CPU here for minutes
        r = await http_request(sc.port(), "GET", "http://reviews/", {"x-user": VALUE}, timeout=10)
        assert r.status == 200
        assert len(up.requests) == 1
        # full match, not search: "xaaa" does not match ^(a+)+$ anchored at both ends
        r = await http_request(sc.port(), "GET", "http://reviews/", {"x-user": "xaaa"})
        assert r.status == 200


async def test_admin_stats_filter_is_re2() -> None:
    async with FakeUpstream() as up, start_sidecar_process(_snapshot(up.port)) as sc:
        # under ``re`` this filter runs for minutes against "cluster.outbound|80||..." names
        flt = quote(r"([a-z_.|0-9]+)+\$", safe="")
        r = await http_request(sc.admin, "GET", f"/stats?filter={flt}", {"Host": "x"}, timeout=10)
        assert r.status == 200
        assert r.text == ""  # no stat name ends in a literal "$"
        # a filter RE2 cannot compile is a 400 that says why
        r = await http_request(sc.admin, "GET", "/stats?filter=%28%3F%3Da%29", {"Host": "x"})
        assert r.status == 400
        assert "RE2" in r.text
        # the filter is a search (Envoy's admin semantics), so a fragment selects lines
        r = await http_request(sc.admin, "GET", "/stats?filter=upstream_rq", {"Host": "x"})
        assert r.status == 200
        lines = [ln for ln in r.text.splitlines() if ln]
        assert lines and all("upstream_rq" in ln.split(":", 1)[0] for ln in lines)

"""At a gateway (the edge), clients' ``x-envoy-*`` request headers are stripped, as Envoy does
for external requests: ``x-envoy-upstream-rq-timeout-ms`` cannot lengthen or disable the
route's timeout. Sidecar listeners (mesh-internal) keep honouring it."""

from __future__ import annotations

import pytest

from diktyo.testing import FakeUpstream, http_request, http_snapshot, start_sidecar
from diktyo.testing.fake_upstream import Response

ROUTE_TIMEOUT = 0.5
UPSTREAM_DELAY = 2.5


def _snapshot(port: int):
    return http_snapshot(
        {"reviews": [("127.0.0.1", port)]},
        routes={
            "reviews": [
                {
                    "name": "slow",
                    "timeout": ROUTE_TIMEOUT,
                    "clusters": [{"cluster": "outbound|80||reviews", "host": "reviews"}],
                }
            ]
        },
        listeners=[{"name": "gw", "direction": "gateway", "port": 0, "route_table": "outbound"}],
    )


@pytest.mark.parametrize("value", ["15000", "0"])
async def test_gateway_ignores_client_timeout_override(value: str) -> None:
    async with (
        FakeUpstream(Response(body=b"slow", delay=UPSTREAM_DELAY)) as up,
        start_sidecar(_snapshot(up.port)) as sc,
    ):
        r = await http_request(
            sc.port("gw"),
            "GET",
            "/",
            {
                "Host": "reviews",
                "x-envoy-upstream-rq-timeout-ms": value,
                "X-Envoy-Retry-On": "5xx",
                "x-keep": "1",
            },
        )
        assert (r.status, r.body) == (504, b"upstream request timeout")
        (q,) = up.requests
        assert q.headers.get("x-keep") == "1"
        assert not [
            k for k in q.headers if k.startswith("x-envoy-") and k != "x-envoy-attempt-count"
        ]


async def test_sidecar_outbound_still_honours_the_override() -> None:
    async with (
        FakeUpstream(Response(body=b"slow", delay=UPSTREAM_DELAY)) as up,
        start_sidecar(_snapshot(up.port)) as sc,
    ):
        r = await http_request(
            sc.port("outbound"),
            "GET",
            "http://reviews/",
            {"x-envoy-upstream-rq-timeout-ms": "15000"},
        )
        assert (r.status, r.body) == (200, b"slow")

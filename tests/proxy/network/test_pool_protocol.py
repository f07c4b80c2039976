"""Upstream protocol selection: one function reads ``Cluster.protocol``; pools come from it."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from diktyo.core.clock import ManualClock
from diktyo.proxy.network.pool import HTTP1, HTTP2, Http1Pool, new_pool, upstream_protocol
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.testing import http_snapshot


def state(protocol: str) -> ClusterState:
    snap = http_snapshot(
        {"reviews": [("127.0.0.1", 9080)]}, clusters={"reviews": {"protocol": protocol}}
    )
    return ClusterState(snap.clusters[0], ManualClock(), random.Random(1))


@pytest.mark.parametrize(("protocol", "want"), [("http", HTTP1), ("http2", HTTP2), ("grpc", HTTP2)])
def test_the_cluster_protocol_decides(protocol: str, want: str) -> None:
    assert upstream_protocol(state(protocol).cluster) == want


async def test_an_http2_cluster_gets_the_http1_pool_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, "diktyo.proxy"):
        plain = new_pool("outbound|80||reviews", state("http"), loop, None, set())
        assert not caplog.records
        grpc = new_pool("outbound|80||reviews", state("grpc"), loop, None, set())
    assert isinstance(plain, Http1Pool) and isinstance(grpc, Http1Pool)
    assert grpc.protocol == HTTP1
    (rec,) = caplog.records
    assert "'grpc' wants HTTP/2" in rec.getMessage() and "not implemented" in rec.getMessage()

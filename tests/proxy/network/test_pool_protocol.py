"""Upstream protocol selection: one function reads ``Cluster.protocol``; pools come from it."""

from __future__ import annotations

import asyncio
import random

import pytest

from diktyo.core.clock import ManualClock
from diktyo.proxy.network.h2pool import H2ClusterPool
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


def test_h2_upgrade_policy_reaches_the_pool_choice() -> None:
    snap = http_snapshot(
        {"reviews": [("127.0.0.1", 9080)]},
        clusters={"reviews": {"protocol": "http", "upstream_protocol": "HTTP/2"}},
    )
    assert upstream_protocol(snap.clusters[0]) == HTTP2  # h2UpgradePolicy: UPGRADE


async def test_an_http2_cluster_gets_the_http2_pool() -> None:
    loop = asyncio.get_running_loop()
    plain = new_pool("outbound|80||reviews", state("http"), loop, None, set())
    grpc = new_pool("outbound|80||reviews", state("grpc"), loop, None, set())
    assert isinstance(plain, Http1Pool) and plain.protocol == HTTP1
    assert isinstance(grpc, H2ClusterPool) and grpc.protocol == HTTP2

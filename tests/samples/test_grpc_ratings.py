"""The gRPC sample app, direct (no sidecar): all four RPC kinds, metadata, statuses, trailers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from diktyo.samples.grpc_ratings import Client


@pytest.fixture
def ratings_v2() -> Iterator[int]:
    env = {**os.environ, "PORT": "0", "SERVICE_VERSION": "v2", "POD_NAME": "ratings-v2-1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "diktyo.samples.grpc_ratings", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert "listening on grpc://127.0.0.1:" in line, line
    try:
        yield int(line.rsplit(":", 1)[1])
    finally:
        p.terminate()
        p.wait(10)


def test_all_four_kinds_of_rpc(ratings_v2: int) -> None:
    cl = Client(f"127.0.0.1:{ratings_v2}")
    try:
        resp, call = cl.get.with_call({"product": 7}, metadata=(("x-user", "jason"),), timeout=10)
        assert resp == {
            "product": 7,
            "stars": 5,
            "version": "v2",
            "pod": "ratings-v2-1",
            "user": "jason",
        }
        assert ("x-served-by", "ratings-v2-1") in call.trailing_metadata()
        assert [m["seq"] for m in cl.watch({"count": 4}, timeout=10)] == [0, 1, 2, 3]
        assert cl.record(iter([{"a": 1}] * 5), timeout=10) == {"received": 5, "version": "v2"}
        out = list(cl.chat(iter([{"say": "hi"}, {"say": "bye"}]), timeout=10))
        assert out == [{"say": "hi", "version": "v2"}, {"say": "bye", "version": "v2"}]
        with pytest.raises(grpc.RpcError) as err:
            cl.get({"product": 1}, metadata=(("fail", "unavailable"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ratings-v2-1" in err.value.details()
    finally:
        cl.close()

"""A stream reads its listener and the snapshot's runtime through a view built once per
(listener, runtime) and kept on the HTTP/1.1 connection (issue 11, `lean`): a keep-alive
connection's next request after a snapshot swap must run on the new snapshot, and the views
must not keep the old runtime alive."""

from __future__ import annotations

import gc
import weakref

from diktyo.testing import FakeUpstream, http_snapshot, start_sidecar
from diktyo.testing.client import HttpClient


async def test_keep_alive_connection_follows_a_snapshot_swap() -> None:
    async with FakeUpstream() as up:
        first = http_snapshot({"reviews": [("127.0.0.1", up.port)]}, version="1")
        swapped = http_snapshot(
            {"reviews": [("127.0.0.1", up.port)]},
            routes={"reviews": [{"name": "r", "direct_response": {"status": 418, "body": "v2"}}]},
            version="2",
        )
        async with start_sidecar(first) as sc, HttpClient(sc.port()) as c:
            r = await c.get("http://reviews/one")
            assert r.status == 200 and len(up.requests) == 1
            old = weakref.ref(sc.sidecar.rt)
            sc.sidecar.apply(swapped)
            r = await c.get("http://reviews/two")  # the same connection, the new route
            assert r.status == 418 and r.body == b"v2"
            assert len(up.requests) == 1  # answered by the route, never forwarded
            sc.sidecar.apply(first)  # and back: the view follows every swap
            r = await c.get("http://reviews/three")
            assert r.status == 200 and len(up.requests) == 2
            gc.collect()
            assert old() is None, "a listener view kept the first runtime alive"

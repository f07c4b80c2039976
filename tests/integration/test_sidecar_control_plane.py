"""`diktyo sidecar --control-plane URL --node ID`: snapshot over the long-poll protocol, then ACK."""

from __future__ import annotations

import asyncio
import json
import sys

from diktyo.snapshot.codec import encode
from diktyo.testing import (
    FakeUpstream,
    RecordedRequest,
    Response,
    eventually,
    http_request,
    http_snapshot,
)


async def test_sidecar_follows_control_plane_and_acks() -> None:
    async with FakeUpstream(Response(body=b"app")) as app:
        snap = http_snapshot({"reviews": [("127.0.0.1", app.port)]}, version="cp-1")
        body = encode(snap)

        def cp(req: RecordedRequest) -> Response:
            if req.path.startswith("/v1/snapshot") and "version=cp-1" not in req.path:
                return Response(
                    body=body,
                    headers={"content-type": "application/json", "x-diktyo-version": "cp-1"},
                )
            if req.path.startswith("/v1/snapshot"):
                return Response(status=204, body=b"", delay=0.5)
            return Response(body=b"{}", headers={"content-type": "application/json"})

        async with FakeUpstream(handler=cp) as plane:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "diktyo.proxy",
                "--control-plane",
                f"http://127.0.0.1:{plane.port}",
                "--node",
                "test.default",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None
                ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
                assert ready["version"] == "cp-1"
                r = await http_request(ready["listeners"]["outbound"], "GET", "http://reviews/")
                assert r.body == b"app"
                acks = await eventually(
                    lambda: [q for q in plane.requests if q.path == "/v1/ack"],
                    timeout=10,
                    what="an ACK from the sidecar",
                )
                ack = json.loads(acks[0].body)
                assert ack["node"] == "test.default" and ack["version"] == "cp-1"
                assert ack["ok"] is True
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 15)

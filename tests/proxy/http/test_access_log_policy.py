"""The sidecar's Telemetry access logging: the CEL filter sees the request's attributes, a
filter outside the subset rejects the snapshot whole (the old one keeps serving)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from diktyo.snapshot.codec import SnapshotError
from diktyo.snapshot.model import AccessLogPolicy, TelemetryPolicy
from diktyo.testing import FakeUpstream, Response, http_request, http_snapshot, start_sidecar


def _snap(upstream: int, log: Path, flt: str, version: str = "1"):  # type: ignore[no-untyped-def]
    snap = http_snapshot(
        {"reviews": [("127.0.0.1", upstream)]},
        mesh={"access_log": {"enabled": False, "path": str(log)}},
        version=version,
    )
    policy = TelemetryPolicy(client_access_log=AccessLogPolicy(enabled=True, filter=flt))
    return msgspec.structs.replace(snap, telemetry=policy)


async def test_filter_on_headers_path_and_code(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    flt = (
        "request.headers['x-debug'] == '1' "
        "|| (response.code >= 500 && request.path.startsWith('/api'))"
    )
    def handler(req):
        return Response(status=503 if "fail" in req.path else 200)
    async with FakeUpstream(handler=handler) as app, start_sidecar(_snap(app.port, log, flt)) as sc:
        port = sc.port()
        await http_request(port, "GET", "http://reviews/plain")
        await http_request(port, "GET", "http://reviews/debug", {"x-debug": "1"})
        await http_request(port, "GET", "http://reviews/api/fail")
        await http_request(port, "GET", "http://reviews/web/fail")
        lines = log.read_text().splitlines()
    assert [ln.split('"')[1].split()[1] for ln in lines] == ["/debug", "/api/fail"]


async def test_unsupported_filter_rejects_the_snapshot(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with FakeUpstream() as app, start_sidecar(_snap(app.port, log, "")) as sc:
        with pytest.raises(SnapshotError, match="attribute 'response.status' is not supported"):
            sc.sidecar.apply(_snap(app.port, log, "response.status >= 500", version="2"))
        r = await http_request(sc.port(), "GET", "http://reviews/still")
        assert r.status == 200 and sc.sidecar.rt.snapshot.version == "1"
        assert "/still" in log.read_text()  # the old policy (log everything) still applies

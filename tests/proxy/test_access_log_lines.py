"""The sidecar's access log lines come from ``diktyo.telemetry.access_log`` (one formatter):
Istio's default text layout with Envoy's millisecond start time, a header value cannot break
a field, and JSON has Istio's keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

from diktyo.testing import FakeUpstream, http_request, http_snapshot, start_sidecar

# [START] "METHOD PATH PROTO" CODE FLAGS DETAILS TERM "FAILURE" RX TX DUR UST "XFF" "UA" "RID" ...
TEXT = re.compile(
    r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "(?P<method>\S+) (?P<path>\S+) HTTP/1\.1" '
    r'(?P<code>\d+) (?P<flags>\S+) \S+ \S+ "[^"]*" \d+ \d+ \d+ \S+ '
    r'"(?P<xff>(?:[^"\\]|\\.)*)" "(?P<ua>(?:[^"\\]|\\.)*)" "(?P<rid>(?:[^"\\]|\\.)*)" '
    r'"(?P<authority>[^"]*)" "(?P<upstream>[^"]*)" (?P<cluster>\S+) \S+ \S+ (?P<peer>\S+) \S+ '
    r"(?P<route>\S+)$"
)


async def test_text_line_layout_and_a_quote_in_a_header_cannot_break_it(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with FakeUpstream() as app:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh={"access_log": {"enabled": True, "path": str(log)}},
        )
        async with start_sidecar(snap) as sc:
            ua = 'evil" 200 - "x'
            r = await http_request(sc.port(), "GET", "http://reviews/p?q=1", {"user-agent": ua})
            assert r.status == 200
            await http_request(sc.port(), "GET", "http://reviews/second")
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines
    m = TEXT.match(lines[0])
    assert m is not None, lines[0]
    assert m["method"] == "GET" and m["path"] == "/p?q=1" and m["code"] == "200"
    assert m["ua"] == 'evil\\" 200 - \\"x'  # escaped, still one field
    assert m["upstream"] == f"127.0.0.1:{app.port}" and m["cluster"].startswith("outbound|")
    assert m["peer"].startswith("127.0.0.1") and m["rid"] != "-"


async def test_json_line_has_istio_keys(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with FakeUpstream() as app:
        snap = http_snapshot(
            {"reviews": [("127.0.0.1", app.port)]},
            mesh={"access_log": {"enabled": True, "path": str(log), "format": "json"}},
        )
        async with start_sidecar(snap) as sc:
            await http_request(sc.port(), "GET", "http://reviews/j", {"user-agent": 'a"b'})
    (line,) = log.read_text().splitlines()
    rec = json.loads(line)
    assert rec["path"] == "/j" and rec["response_code"] == 200 and rec["user_agent"] == 'a"b'
    assert rec["upstream_cluster"].startswith("outbound|") and rec["response_flags"] == "-"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["start_time"])
    for key in ("route_name", "protocol", "bytes_received", "bytes_sent", "duration",
                "downstream_remote_address", "upstream_host", "request_id", "authority"):  # fmt: skip
        assert key in rec, key


def test_grpc_status_goes_to_the_details_slot_and_json() -> None:
    from types import SimpleNamespace as NS

    from diktyo.proxy.access_log import format_json, format_text

    head = NS(method="POST", path="/pkg.Svc/Call", version="2", authority="svc:50051",
              headers={"user-agent": "grpc-python"})  # fmt: skip
    stream = NS(head=head, host=None, cstate=None, route=None, status=200, req_bytes=5,
                resp_bytes=7, out_headers={}, conn=NS(peer="127.0.0.1"), grpc_status="14")  # fmt: skip
    line = format_text(stream, "-", 3.0)
    assert ' 200 - grpc_status=14 - "-" 5 7 3 ' in line
    assert json.loads(format_json(stream, "-", 3.0))["grpc_status"] == "14"
    stream.grpc_status = ""
    assert json.loads(format_json(stream, "-", 3.0))["grpc_status"] is None
    assert ' 200 - - - "-" 5 7 3 ' in format_text(stream, "-", 3.0)

"""Access log lines in Istio's default text and JSON formats."""

from __future__ import annotations

import json

import pytest

from diktyo.telemetry.access_log import AccessRecord, format_record, format_start_time

REC = AccessRecord(
    start_time=1_700_000_000.091,
    method="GET",
    path="/reviews/0",
    response_code=503,
    response_flags="UO",
    response_code_details="upstream_reset_before_response_started{overflow}",
    bytes_received=0,
    bytes_sent=81,
    duration_ms=2,
    user_agent="curl/8.0",
    request_id="8fcedd10-23a4-4b4d-8caa-ade8a92a66a8",
    authority="reviews:9080",
    upstream_cluster="outbound|9080|v2|reviews.default.svc.cluster.local",
    downstream_remote_address="127.0.0.1:40305",
    route_name="default",
)


def test_text_line_matches_istio_layout() -> None:
    line = format_record(REC)
    assert line == (
        '[2023-11-14T22:13:20.091Z] "GET /reviews/0 HTTP/1.1" 503 UO '
        'upstream_reset_before_response_started{overflow} - "-" 0 81 2 - "-" "curl/8.0" '
        '"8fcedd10-23a4-4b4d-8caa-ade8a92a66a8" "reviews:9080" "-" '
        "outbound|9080|v2|reviews.default.svc.cluster.local - - 127.0.0.1:40305 - default\n"
    )


def test_text_line_cannot_be_split_by_header_values() -> None:
    rec = AccessRecord(start_time=0, user_agent='evil\n[fake] "GET')
    line = format_record(rec)
    assert line.count("\n") == 1 and '\\"GET' in line


def test_json_keys_and_nulls() -> None:
    d = json.loads(format_record(REC, "json"))
    assert d["start_time"] == "2023-11-14T22:13:20.091Z"
    assert d["response_code"] == 503 and d["response_flags"] == "UO"
    assert d["upstream_host"] is None and d["duration"] == 2
    assert d["upstream_cluster"].startswith("outbound|9080|v2|")


def test_start_time_rounding_and_bad_encoding() -> None:
    assert format_start_time(0.9996) == "1970-01-01T00:00:00.999Z"
    with pytest.raises(ValueError, match="'text' or 'json'"):
        format_record(REC, "yaml")

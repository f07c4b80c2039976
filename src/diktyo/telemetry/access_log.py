"""Istio's default access log line (text and JSON) from a small record object.

Text format (Istio's ``meshConfig.accessLogFormat`` default, one line per request)::

  [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
  %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
  "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
  %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
  "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER%
  %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
  %REQUESTED_SERVER_NAME% %ROUTE_NAME%

Missing values print as ``-`` (text) or ``null`` (JSON), as Envoy does. Only called when access
logging is on, after the response is done.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class AccessRecord:
    """What one request looked like from the sidecar. Times in wall-clock seconds / ms."""

    start_time: float
    method: str = ""
    path: str = ""  # x-envoy-original-path if the route rewrote it, else :path
    protocol: str = "HTTP/1.1"
    response_code: int = 0
    response_flags: str = "-"
    response_code_details: str = ""  # "via_upstream", "fault_filter_abort", "rbac_access_denied"
    connection_termination_details: str = ""
    upstream_transport_failure_reason: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    duration_ms: int = 0
    upstream_service_time: int | None = None  # x-envoy-upstream-service-time, ms
    x_forwarded_for: str = ""
    user_agent: str = ""
    request_id: str = ""
    authority: str = ""
    upstream_host: str = ""  # "10.0.0.7:9080"
    upstream_cluster: str = ""
    upstream_local_address: str = ""
    downstream_local_address: str = ""
    downstream_remote_address: str = ""
    requested_server_name: str = ""
    route_name: str = ""
    grpc_status: str = ""  # gRPC requests: the grpc-status the response ended with (%GRPC_STATUS%)


def format_start_time(t: float) -> str:
    """``2026-11-28T09:01:07.123Z`` (UTC, milliseconds), Envoy's default %START_TIME%."""
    ms = int(t * 1000)  # truncated like Envoy's %3f
    secs, milli = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{milli:03d}Z"


def _clean(v: str) -> str:
    """Envoy prints "-" for empty values; never let a header value break the line."""
    if not v:
        return "-"
    if "\n" in v or "\r" in v or '"' in v:
        v = v.replace("\r", "").replace("\n", " ").replace('"', '\\"')
    return v


def format_text(r: AccessRecord) -> str:
    """One line in Istio's default TEXT format, with the trailing newline."""
    ust = "-" if r.upstream_service_time is None else str(r.upstream_service_time)
    return (
        f'[{format_start_time(r.start_time)}] "{_clean(r.method)} {_clean(r.path)} '
        f'{_clean(r.protocol)}" {r.response_code} {_clean(r.response_flags)} '
        f"{_clean(r.response_code_details)} {_clean(r.connection_termination_details)} "
        f'"{_clean(r.upstream_transport_failure_reason)}" {r.bytes_received} {r.bytes_sent} '
        f'{r.duration_ms} {ust} "{_clean(r.x_forwarded_for)}" "{_clean(r.user_agent)}" '
        f'"{_clean(r.request_id)}" "{_clean(r.authority)}" "{_clean(r.upstream_host)}" '
        f"{_clean(r.upstream_cluster)} {_clean(r.upstream_local_address)} "
        f"{_clean(r.downstream_local_address)} {_clean(r.downstream_remote_address)} "
        f"{_clean(r.requested_server_name)} {_clean(r.route_name)}\n"
    )


def _opt(v: str) -> str | None:
    return v or None


def to_json_dict(r: AccessRecord) -> dict[str, Any]:
    """Istio's JSON access log keys (``accessLogEncoding: JSON``)."""
    return {
        "start_time": format_start_time(r.start_time),
        "route_name": _opt(r.route_name),
        "method": _opt(r.method),
        "path": _opt(r.path),
        "protocol": _opt(r.protocol),
        "response_code": r.response_code,
        "grpc_status": _opt(r.grpc_status),
        "response_flags": _opt(r.response_flags),
        "response_code_details": _opt(r.response_code_details),
        "connection_termination_details": _opt(r.connection_termination_details),
        "upstream_transport_failure_reason": _opt(r.upstream_transport_failure_reason),
        "bytes_received": r.bytes_received,
        "bytes_sent": r.bytes_sent,
        "duration": r.duration_ms,
        "upstream_service_time": (
            None if r.upstream_service_time is None else str(r.upstream_service_time)
        ),
        "x_forwarded_for": _opt(r.x_forwarded_for),
        "user_agent": _opt(r.user_agent),
        "request_id": _opt(r.request_id),
        "authority": _opt(r.authority),
        "upstream_host": _opt(r.upstream_host),
        "upstream_cluster": _opt(r.upstream_cluster),
        "upstream_local_address": _opt(r.upstream_local_address),
        "downstream_local_address": _opt(r.downstream_local_address),
        "downstream_remote_address": _opt(r.downstream_remote_address),
        "requested_server_name": _opt(r.requested_server_name),
    }


def format_json(r: AccessRecord) -> str:
    """One JSON object per line, with the trailing newline."""
    return json.dumps(to_json_dict(r), separators=(",", ":")) + "\n"


def format_record(r: AccessRecord, encoding: str = "text") -> str:
    """``encoding`` is the snapshot's ``AccessLog.format``: "text" or "json"."""
    if encoding == "json":
        return format_json(r)
    if encoding == "text":
        return format_text(r)
    raise ValueError(f"access log format must be 'text' or 'json', got {encoding!r}")

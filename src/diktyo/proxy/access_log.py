"""Access log lines in Istio's default text format (or JSON), written when the mesh enables them."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from diktyo.snapshot.model import AccessLog


def _q(v: str | None) -> str:
    return v if v else "-"


def format_text(s: Any, flags: str, dur_ms: float) -> str:
    """Istio's default format: ``[START] "METHOD PATH PROTO" CODE FLAGS ... ROUTE``."""
    head = s.head
    h = head.headers
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - dur_ms / 1000))
    host = s.host
    upstream_host = f"{host.address}:{host.port}" if host is not None else "-"
    cluster = s.cstate.cluster.name if s.cstate is not None else "-"
    route = s.route.route.name if s.route is not None and s.route.route.name else "default"
    return (
        f'[{start}Z] "{head.method} {head.path} HTTP/{head.version}" {s.status} {flags} - - "-" '
        f"{s.req_bytes} {s.resp_bytes} {int(dur_ms)} - "
        f'"{_q(h.get("x-forwarded-for"))}" "{_q(h.get("user-agent"))}" '
        f'"{_q(s.out_headers.get("x-request-id") or h.get("x-request-id"))}" '
        f'"{_q(head.authority)}" "{upstream_host}" {cluster} - - {s.conn.peer or "-"} - {route}\n'
    )


def format_json(s: Any, flags: str, dur_ms: float) -> str:
    head = s.head
    h = head.headers
    host = s.host
    return (
        json.dumps(
            {
                "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "method": head.method,
                "path": head.path,
                "protocol": f"HTTP/{head.version}",
                "response_code": s.status,
                "response_flags": flags,
                "bytes_received": s.req_bytes,
                "bytes_sent": s.resp_bytes,
                "duration": int(dur_ms),
                "x_forwarded_for": h.get("x-forwarded-for"),
                "user_agent": h.get("user-agent"),
                "request_id": s.out_headers.get("x-request-id") or h.get("x-request-id"),
                "authority": head.authority,
                "upstream_host": f"{host.address}:{host.port}" if host is not None else None,
                "upstream_cluster": s.cstate.cluster.name if s.cstate is not None else None,
            }
        )
        + "\n"
    )


def make_access_logger(cfg: AccessLog) -> Callable[[Any, str, float], None]:
    fmt = format_json if cfg.format == "json" else format_text
    out: IO[str]
    if cfg.path in ("/dev/stdout", "-", ""):
        out = sys.stdout
    elif cfg.path == "/dev/stderr":
        out = sys.stderr
    else:
        out = open(cfg.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the runtime

    def log(stream: Any, flags: str, dur_ms: float) -> None:
        out.write(fmt(stream, flags, dur_ms))
        out.flush()

    return log

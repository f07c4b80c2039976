"""Access log lines in Istio's default text format (or JSON), written when the mesh enables them."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from diktyo.snapshot.model import AccessLog, TelemetryPolicy


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


def attributes(s: Any, flags: str) -> dict[str, Any]:
    """Envoy's request attributes (``diktyo.telemetry.cel.ATTRIBUTES``) of a finished stream."""
    head = s.head
    path = head.path
    host = s.host
    cluster = s.cstate.cluster.name if s.cstate is not None else ""
    h = head.headers
    return {
        "request.path": path,
        "request.url_path": path.split("?", 1)[0],
        "request.query": path.split("?", 1)[1] if "?" in path else "",
        "request.host": head.authority,
        "request.scheme": head.scheme,
        "request.method": head.method,
        "request.headers": h,
        "request.referer": h.get("referer", ""),
        "request.useragent": h.get("user-agent", ""),
        "request.id": s.out_headers.get("x-request-id") or h.get("x-request-id", ""),
        "request.protocol": f"HTTP/{head.version}",
        "request.size": s.req_bytes,
        "request.total_size": s.req_bytes,
        "response.code": s.status,
        "response.flags": flags,
        "response.size": s.resp_bytes,
        "response.total_size": s.resp_bytes,
        "source.address": s.conn.peer or "",
        "upstream.address": f"{host.address}:{host.port}" if host is not None else "",
        "upstream.port": host.port if host is not None else 0,
        "xds.cluster_name": cluster,
        "xds.route_name": s.route.route.name if s.route is not None else "",
    }


def make_policy_logger(
    cfg: AccessLog, policy: TelemetryPolicy
) -> Callable[[Any, str, float], None] | None:
    """The Telemetry API's access logging: on/off and a CEL filter per direction (client =
    outbound and gateway listeners, server = inbound); None when both directions are off."""
    from diktyo.telemetry.cel import compile_filter

    client, server = policy.client_access_log, policy.server_access_log
    if not client.enabled and not server.enabled:
        return None
    write = make_access_logger(cfg)
    cf = compile_filter(client.filter) if client.enabled and client.filter else None
    sf = compile_filter(server.filter) if server.enabled and server.filter else None
    client_on, server_on = client.enabled, server.enabled

    def log(stream: Any, flags: str, dur_ms: float) -> None:
        if stream.ctx.reporter == "destination":
            on, flt = server_on, sf
        else:
            on, flt = client_on, cf
        if not on or (flt is not None and not flt(attributes(stream, flags))):
            return
        write(stream, flags, dur_ms)

    return log

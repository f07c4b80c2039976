"""Access log lines in Istio's default text format (or JSON), written when the mesh enables them.

Theory of operation
-------------------
Writing must never block the event loop: a stalled reader of the sidecar's stdout (a paused
supervisor, a full pipe) would otherwise stop all traffic. ``AccessLogWriter`` owns its own
non-blocking file description (``/proc/self/fd/N`` reopened, so ``O_NONBLOCK`` does not leak to
other holders of the same pipe or terminal; ``dup`` where that is impossible) and a bounded
buffer (``MAX_BUFFER`` bytes). A line is written at once if the fd takes it; otherwise it is
buffered and flushed when the loop says the fd is writable. When the buffer is full the line
is dropped, ``access_log_lines_dropped`` is counted in the admin stats, and a warning is
logged at most once per ``WARN_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

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
    g = getattr(s, "grpc_status", "")  # gRPC: in the %RESPONSE_CODE_DETAILS% slot
    details = f"grpc_status={g}" if g else "-"
    return (
        f'[{start}Z] "{head.method} {head.path} HTTP/{head.version}" {s.status} {flags} {details} - "-" '
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
                "grpc_status": getattr(s, "grpc_status", "") or None,
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


log = logging.getLogger("diktyo.proxy")

MAX_BUFFER = 1024 * 1024  # bytes of access log waiting for a slow reader; then lines drop
WARN_INTERVAL = 10.0


def _open_nonblocking(path: str) -> int:
    """A new non-blocking fd for ``path`` (stdout/stderr reopened through /proc, or a file)."""
    std = {"/dev/stdout": 1, "-": 1, "": 1, "/dev/stderr": 2}.get(path)
    if std is None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
    else:
        with contextlib.suppress(OSError):
            (sys.stdout if std == 1 else sys.stderr).flush()
        try:
            # a new open file description: O_NONBLOCK stays ours, not the terminal's or pipe's
            fd = os.open(f"/proc/self/fd/{std}", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        except OSError:
            fd = os.dup(std)  # e.g. a socket: shares the description, still non-blocking below
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return fd


class AccessLogWriter:
    """Bounded, non-blocking line writer on the event loop (see module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: str,
        stats: dict[str, int],
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self.loop = loop
        self.path = path
        self.fd = _open_nonblocking(path)
        self.stats = stats  # Stats.server: access_log_lines_dropped / _written
        self.max_buffer = max_buffer
        self.buf: deque[bytes] = deque()
        self.buffered = 0
        self.watching = False
        self.dropped_since_warn = 0
        self.last_warn = -WARN_INTERVAL
        self.closed = False

    def write(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        if self.closed:
            return
        if not self.buf:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._drop(f"write failed: {exc.strerror}")
                return
            if n == len(data):
                self.stats["access_log_lines_written"] = (
                    self.stats.get("access_log_lines_written", 0) + 1
                )
                return
            data = data[n:]
        if self.buffered + len(data) > self.max_buffer:
            self._drop("the reader is not keeping up and the buffer is full")
            return
        self.buf.append(data)
        self.buffered += len(data)
        self.stats["access_log_lines_written"] = self.stats.get("access_log_lines_written", 0) + 1
        if not self.watching:
            self.watching = True
            self.loop.add_writer(self.fd, self._flush)

    def _drop(self, why: str) -> None:
        self.stats["access_log_lines_dropped"] = self.stats.get("access_log_lines_dropped", 0) + 1
        self.dropped_since_warn += 1
        now = time.monotonic()
        if now - self.last_warn >= WARN_INTERVAL:
            log.warning(
                "access log %s: dropped %d line(s): %s (buffer %d bytes); see "
                "access_log_lines_dropped in the admin /stats",
                self.path, self.dropped_since_warn, why, self.max_buffer,
            )  # fmt: skip
            self.last_warn = now
            self.dropped_since_warn = 0

    def _flush(self) -> None:
        while self.buf:
            data = self.buf[0]
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                return
            except OSError as exc:
                self._drop(f"write failed: {exc.strerror}")
                self.buf.clear()
                self.buffered = 0
                break
            self.buffered -= n
            if n < len(data):
                self.buf[0] = data[n:]
                return
            self.buf.popleft()
        if self.watching:
            self.watching = False
            self.loop.remove_writer(self.fd)

    def flush_and_close(self) -> None:
        """What the fd takes now is written (never waits), the rest is dropped; then close."""
        self._flush()
        if self.buf:
            for _ in self.buf:
                self._drop("the sidecar is stopping and the reader is not keeping up")
            self.buf.clear()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watching:
            self.loop.remove_writer(self.fd)
            self.watching = False
        with contextlib.suppress(OSError):
            os.close(self.fd)


class NonBlockingLogHandler(logging.Handler):
    """The sidecar's stderr log handler: one ``os.write`` per record on a non-blocking fd of
    its own; a record the reader has no room for is dropped (and counted in ``dropped``),
    never waited for. Lines up to PIPE_BUF (4 KiB) reach a pipe whole or not at all."""

    def __init__(self, path: str = "/dev/stderr") -> None:
        super().__init__()
        self.fd = _open_nonblocking(path)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            n = os.write(self.fd, data)
            if n < len(data):
                self.dropped += 1
        except BlockingIOError:
            self.dropped += 1
        except Exception:  # noqa: BLE001 - logging must never take the sidecar down
            self.handleError(record)


def make_access_logger(
    cfg: AccessLog, writer: AccessLogWriter | None = None
) -> Callable[[Any, str, float], None]:
    """A per-request callback writing ``cfg.format`` lines to ``writer`` (the sidecar keeps
    one writer per path across snapshot swaps)."""
    fmt = format_json if cfg.format == "json" else format_text
    if writer is None:
        writer = AccessLogWriter(asyncio.get_event_loop(), cfg.path, {})
    write = writer.write

    def access_log(stream: Any, flags: str, dur_ms: float) -> None:
        write(fmt(stream, flags, dur_ms))

    return access_log


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
    cfg: AccessLog, policy: TelemetryPolicy, writer: AccessLogWriter | None = None
) -> Callable[[Any, str, float], None] | None:
    """The Telemetry API's access logging: on/off and a CEL filter per direction (client =
    outbound and gateway listeners, server = inbound); None when both directions are off."""
    from diktyo.telemetry.cel import compile_filter

    client, server = policy.client_access_log, policy.server_access_log
    if not client.enabled and not server.enabled:
        return None
    write = make_access_logger(cfg, writer)
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

"""The sidecar's status server for the kubelet: Istio's 15020 (status) and 15021 (readiness).

In a pod the admin port stays on 127.0.0.1; the kubelet probes the pod IP, so this server
binds ``0.0.0.0`` (``DIKTYO_STATUS_ADDRESS``) on two ports, as Istio's sidecar does:

- the **readiness port** (15021) answers ``GET /healthz/ready``: 200 once a snapshot is
  applied and every listener is serving, 503 before that and while draining. Any other path
  is 404. The injected ``diktyo-proxy`` container's readinessProbe points here.
- the **status port** (15020) answers ``/healthz/ready`` too, ``/stats/prometheus`` (the
  sidecar's metrics, so Prometheus scrapes the pod IP as Istio's ``prometheus.io/port:
  15020`` says), and ``/app-health/<container>/readyz|livez|startupz``: the app's own probes,
  which the injector rewrote to point here (``DIKTYO_KUBE_APP_PROBERS``, Istio's
  ``ISTIO_KUBE_APP_PROBERS`` JSON). The sidecar runs the original probe against the pod IP:

  - ``httpGet``: a GET to ``http[s]://POD_IP:PORT/PATH`` with the kubelet's headers (Host
    rewritten to the app port when it named the status port), TLS unverified like the
    kubelet's, within ``timeoutSeconds``. The app's status code and up to 10 KiB of its body
    come back; a redirect to the same host is followed (at most 10), any other redirect
    counts as success (200), as the kubelet does. No answer in time / refused: 500.
  - ``tcpSocket``: 200 if a connection to ``POD_IP:PORT`` opens within the timeout, else 500.
  - ``grpc``: the gRPC health check (``grpc.health.v1.Health/Check`` with the probe's
    ``service``) over plaintext HTTP/2 to ``POD_IP:PORT``: 200 if the answer is ``SERVING``,
    else 500 (``NOT_SERVING``, an error status such as unknown service or unimplemented, no
    answer in time), as the kubelet's gRPC probe decides.

  An unknown probe path is 400, as Istio answers. Probe connections come from 127.0.0.6
  (Istio's inbound passthrough source), which the capture rules never redirect.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("diktyo.proxy.status")

MAX_HEAD = 16 * 1024
MAX_BODY = 10 * 1024  # Istio returns at most 10 KiB of the app's probe body
PASSTHROUGH_SOURCE = "127.0.0.6"
_HOP = {"connection", "keep-alive", "content-length", "transfer-encoding", "host", "upgrade",
        "te", "trailer", "proxy-connection"}
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _response(status: int, body: bytes, close: bool, ctype: str = "text/plain",
              head_only: bool = False) -> bytes:
    reason = _REASONS.get(status, "Status")
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
    if body:
        head += f"content-type: {ctype}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + (b"" if head_only else body)


@dataclass
class ProbeResult:
    status: int
    body: bytes = b""


@dataclass
class StatusServer:
    """Serves the readiness and status ports. ``ready()`` and ``metrics()`` come from the sidecar."""

    ready: Callable[[], bool]
    metrics: Callable[[], str]
    probers: dict[str, dict[str, Any]] = field(default_factory=dict)
    pod_ip: str = "127.0.0.1"
    source: str | None = PASSTHROUGH_SOURCE
    servers: list[asyncio.Server] = field(default_factory=list)
    status_port: int = 0
    readiness_port: int = 0
    probes: int = 0
    probe_failures: int = 0
    _last_ready: bool | None = None

    async def start(self, address: str, status_port: int | None,
                    readiness_port: int | None) -> None:
        """Bind the ports that are given (None = not served)."""
        if status_port is not None:
            srv = await asyncio.start_server(
                lambda r, w: self._serve(r, w, full=True), address, status_port, reuse_address=True)
            self.servers.append(srv)
            self.status_port = srv.sockets[0].getsockname()[1]
            log.info("status port %s:%d (/healthz/ready, /app-health/..., /stats/prometheus; "
                     "%d app probes)", address, self.status_port, len(self.probers))
        if readiness_port is not None:
            srv = await asyncio.start_server(
                lambda r, w: self._serve(r, w, full=False), address, readiness_port,
                reuse_address=True)
            self.servers.append(srv)
            self.readiness_port = srv.sockets[0].getsockname()[1]
            log.info("readiness port %s:%d (/healthz/ready)", address, self.readiness_port)

    def close(self) -> None:
        for srv in self.servers:
            srv.close()

    # ------------------------------------------------------------------ serving
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     full: bool) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, b"request head too large\n", True))
                    break
                except asyncio.IncompleteReadError:
                    break
                if len(head) > MAX_HEAD:
                    writer.write(_response(431, b"request head too large\n", True))
                    break
                parsed = _parse_head(head)
                if parsed is None:
                    writer.write(_response(400, b"malformed request\n", True))
                    break
                method, target, version, headers = parsed
                if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                    writer.write(_response(400, b"probe requests carry no body\n", True))
                    break
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                status, body, ctype = await self.handle(method, target, headers, full)
                writer.write(_response(status, body, close, ctype, head_only=method == "HEAD"))
                await writer.drain()
                if close:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, method: str, target: str, headers: dict[str, str],
                     full: bool = True) -> tuple[int, bytes, str]:
        path = target.split("?", 1)[0]
        if path == "/healthz/ready":
            ok = self.ready()
            if ok != self._last_ready:
                log.info("readiness: %s", "ready" if ok else "NOT ready (no snapshot yet, or draining)")
                self._last_ready = ok
            return (200, b"", "text/plain") if ok else (503, b"not ready\n", "text/plain")
        if not full:
            return 404, b"the readiness port serves GET /healthz/ready only\n", "text/plain"
        if path in ("/stats/prometheus", "/metrics"):
            return 200, self.metrics().encode(), "text/plain; version=0.0.4"
        if path.startswith("/app-health/"):
            if method not in ("GET", "HEAD"):
                return 405, b"probes are GET requests\n", "text/plain"
            prober = self.probers.get(path)
            if prober is None:
                return 400, f"app prober config does not exist for {path}\n".encode(), "text/plain"
            result = await self.probe(path, prober, headers)
            return result.status, result.body, "text/plain"
        return 404, (b"diktyo sidecar status: GET /healthz/ready, /stats/prometheus, "
                     b"/app-health/<container>/readyz|livez|startupz\n"), "text/plain"

    # ------------------------------------------------------------------ probing the app
    async def probe(self, path: str, prober: dict[str, Any], headers: dict[str, str]) -> ProbeResult:
        self.probes += 1
        timeout = float(prober.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in prober:
                result = await asyncio.wait_for(
                    self._http_probe(prober["httpGet"], headers), timeout)
            elif "tcpSocket" in prober:
                conn = await asyncio.wait_for(self._connect(prober["tcpSocket"]["port"], None), timeout)
                conn[1].close()
                result = ProbeResult(200)
            else:
                result = await asyncio.wait_for(self._grpc_probe(prober["grpc"], headers), timeout)
        except TimeoutError:
            log.warning("app probe %s: no answer within %gs", path, timeout)
            result = ProbeResult(500, f"probe timed out after {timeout:g}s\n".encode())
        except (OSError, ValueError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.warning("app probe %s failed: %s: %s", path, type(exc).__name__, exc)
            result = ProbeResult(500, f"probe failed: {type(exc).__name__}\n".encode())
        if result.status >= 400:
            self.probe_failures += 1
        return result

    async def _connect(self, port: int, tls: ssl.SSLContext | None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = self.pod_ip
        local = (self.source, 0) if self.source and ":" not in host else None
        try:
            return await asyncio.open_connection(host, port, ssl=tls, local_addr=local,
                                                 server_hostname="" if tls else None)
        except OSError as exc:
            if local is None or exc.errno != 99:  # EADDRNOTAVAIL: no 127.0.0.6 here
                raise
            self.source = None
            return await asyncio.open_connection(host, port, ssl=tls,
                                                 server_hostname="" if tls else None)

    async def _http_probe(self, action: dict[str, Any], in_headers: dict[str, str]) -> ProbeResult:
        port, scheme = int(action["port"]), action.get("scheme", "HTTP")
        tls = None
        if scheme == "HTTPS":
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates
        host_header = in_headers.get("host") or f"{self.pod_ip}:{port}"
        h, _, p = host_header.rpartition(":")
        if h and p.isdigit() and int(p) == self.status_port:
            host_header = f"{h}:{port}"
        extra = [(k, v) for k, v in in_headers.items() if k not in _HOP]
        path = action["path"]
        for _ in range(11):
            status, location, body = await self._http_get(port, tls, path, host_header, extra)
            if 300 <= status < 400:
                target = urlsplit(location) if location else None
                if target is None or (target.hostname and target.hostname != self.pod_ip
                                      and target.hostname != h):
                    return ProbeResult(200)  # a redirect elsewhere counts as success (kubelet)
                path = (target.path or "/") + (f"?{target.query}" if target.query else "")
                continue
            return ProbeResult(status, body[:MAX_BODY])
        raise ValueError("stopped after 10 redirects")

    async def _http_get(self, port: int, tls: ssl.SSLContext | None, path: str, host: str,
                        headers: list[tuple[str, str]]) -> tuple[int, str, bytes]:
        reader, writer = await self._connect(port, tls)
        try:
            lines = [f"GET {path} HTTP/1.1", f"host: {host}", "connection: close"]
            lines += [f"{k}: {v}" for k, v in headers]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *rest = head.decode("latin-1").split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            resp_headers = {}
            for line in rest:
                name, sep, value = line.partition(":")
                if sep:
                    resp_headers[name.strip().lower()] = value.strip()
            body = await _read_body(reader, resp_headers)
            return int(parts[1]), resp_headers.get("location", ""), body
        finally:
            writer.close()


    async def _grpc_probe(self, action: dict[str, Any], in_headers: dict[str, str]) -> ProbeResult:
        """``grpc.health.v1.Health/Check`` over h2c (prior knowledge), as the kubelet sends it."""
        port = int(action["port"])
        reader, writer = await self._connect(port, None)
        try:
            service = str(action.get("service") or "").encode()
            request = (b"\x0a" + _varint(len(service)) + service) if service else b""
            headers = b"".join(_hpack(n, v) for n, v in (
                (b":method", b"POST"), (b":scheme", b"http"),
                (b":path", b"/grpc.health.v1.Health/Check"),
                (b":authority", f"{self.pod_ip}:{port}".encode()),
                (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                (b"user-agent", in_headers.get("user-agent", "diktyo-probe").encode("latin-1")),
            ))  # fmt: skip
            message = b"\x00" + len(request).to_bytes(4, "big") + request
            writer.write(H2_PREFACE + _h2_frame(4, 0, 0, b"") + _h2_frame(1, 4, 1, headers)
                         + _h2_frame(0, 1, 1, message))
            await writer.drain()
            data = b""
            while True:
                head = await reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if kind == 4 and not flags & 1:  # SETTINGS: acknowledge
                    writer.write(_h2_frame(4, 1, 0, b""))
                elif kind == 6 and not flags & 1:  # PING: answer
                    writer.write(_h2_frame(6, 1, 0, payload))
                elif kind == 7 or (kind == 3 and stream == 1):  # GOAWAY, RST_STREAM
                    return ProbeResult(500, b"gRPC health check: stream reset\n")
                elif kind == 0 and stream == 1:
                    if flags & 8:  # PADDED
                        payload = payload[1:len(payload) - payload[0]]
                    data += payload
                if stream == 1 and kind in (0, 1) and flags & 1:  # END_STREAM
                    break
        finally:
            writer.close()
        status = _health_status(data)
        if status == 1:  # SERVING
            return ProbeResult(200)
        names = {0: "UNKNOWN", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
        what = names.get(status, "no answer (an error status)") if status is not None else (
            "no answer (an error status: unknown service or not implemented)")
        return ProbeResult(500, f"gRPC health check: {what}\n".encode())


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack(name: bytes, value: bytes) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _health_status(data: bytes) -> int | None:
    """The ``status`` of a length-prefixed ``HealthCheckResponse``, or None without one."""
    if len(data) < 5 or data[0] != 0:
        return None
    msg = data[5:5 + int.from_bytes(data[1:5], "big")]
    i, status = 0, 0  # proto3: an absent field is its default, UNKNOWN (0)
    while i < len(msg):
        tag = msg[i]
        i += 1
        if tag == 0x08:  # field 1, varint
            value, shift = 0, 0
            while i < len(msg):
                b = msg[i]
                i += 1
                value |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            status = value
        else:
            return status  # other fields: not in grpc.health.v1; stop reading
    return status


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """Up to MAX_BODY bytes of the response body (the rest is not read)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = b""
        while len(out) < MAX_BODY:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
            except ValueError:
                break
            if size == 0:
                break
            out += await reader.readexactly(size)
            await reader.readline()
        return out
    length = headers.get("content-length")
    want = min(int(length), MAX_BODY) if length is not None and length.isdigit() else MAX_BODY
    out = b""
    while len(out) < want:
        chunk = await reader.read(want - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]] | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        return None
    request_line, *lines = text[:-4].split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[1].startswith("/") or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            return None
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers

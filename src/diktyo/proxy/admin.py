"""Admin server on its own port: /ready, /stats/prometheus, /config_dump, /clusters, POST /drain.

Endpoints that change state (``POST /drain``, ``/quitquitquit``, ``/drain_listeners``) need
``Authorization: Bearer TOKEN``. The token comes from a 0600 file (``--admin-token-file`` or
``$DIKTYO_ADMIN_TOKEN_FILE``; created with a fresh token if missing) or, with neither, is
generated into ``$DIKTYO_HOME/sidecars/PID/admin-token`` (0600, removed at exit; if no state
dir is writable, e.g. a read-only root filesystem, the token stays in memory and those
endpoints cannot be used: SIGTERM still drains). The ready line names the file. Read-only
endpoints stay open (the admin port listens on loopback unless told otherwise).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import stat

# hmac's compare_digest (constant time) without importing hmac/hashlib into the sidecar
from _operator import _compare_digest as compare_digest
from typing import Any

import msgspec

from diktyo.core.regex import RegexError, compile_re2
from diktyo.proxy import memory
from diktyo.proxy.codec.http1 import CodecError, RequestDecoder, RequestHead, local_response
from diktyo.proxy.network.listener import bind_listener

ROUTES_HELP = (
    "diktyo sidecar admin: GET /ready, /stats/prometheus, /stats, /config_dump, /clusters, "
    "/workers, /listeners, /memory; POST /drain (or /quitquitquit) with Authorization: Bearer "
    "TOKEN\n"
)
MUTATING = frozenset({"/drain", "/quitquitquit", "/drain_listeners"})
TOKEN_FILE_ENV = "DIKTYO_ADMIN_TOKEN_FILE"

log = logging.getLogger("diktyo.proxy")


class AdminTokenError(Exception):
    """The admin token file cannot be used (unsafe mode, unreadable, empty)."""


def new_token() -> str:
    """A fresh random bearer token: 32 bytes from the OS, URL-safe base64 (what
    ``secrets.token_urlsafe(32)`` makes, without loading ``secrets``' imports into the sidecar)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


# token paths are str and os.path, not pathlib: pathlib (with urllib.parse and ipaddress)
# would stay in every sidecar for these few calls at start-up, ~0.6 MiB (issue 11)
def default_token_path() -> str:
    """``$DIKTYO_HOME/sidecars/PID/admin-token`` (``DIKTYO_HOME`` defaults to ``~/.diktyo``)."""
    home = os.environ.get("DIKTYO_HOME") or os.path.join(os.path.expanduser("~"), ".diktyo")
    return os.path.join(home, "sidecars", str(os.getpid()), "admin-token")


def load_or_create_token(path: str) -> tuple[str, bool]:
    """Read the bearer token from ``path`` (must not be readable by group or others), or write
    a fresh one there with mode 0600 if it does not exist. Returns (token, created)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise AdminTokenError(f"cannot create admin token file {path}: {exc.strerror}") from None
    else:
        token = new_token()
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AdminTokenError(
                f"admin token file {path} is accessible by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise AdminTokenError(f"cannot read admin token file {path}: {exc.strerror}") from None
    if not token:
        raise AdminTokenError(f"admin token file {path} is empty; put a token in it or delete it")
    return token, False


def resolve_token(token_file: str) -> tuple[str, str | None, bool]:
    """The admin token: from ``token_file`` (errors are fatal: the operator asked for it), else
    generated into the first writable state dir. Returns (token, path or None, created)."""
    if token_file:
        path = token_file
        token, created = load_or_create_token(path)
        return token, path, created
    path = default_token_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # the leaf gets 0700
        token, created = load_or_create_token(path)
        return token, path, created
    except (AdminTokenError, OSError) as exc:
        log.warning(
            "no admin token file (%s): POST /drain and /quitquitquit are disabled; pass "
            "--admin-token-file FILE (or $%s) to use them, SIGTERM drains either way",
            exc, TOKEN_FILE_ENV,
        )  # fmt: skip
        return new_token(), None, False


class AdminConnection(asyncio.Protocol):
    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.decoder = RequestDecoder(self)
        self.transport: asyncio.Transport | None = None
        self.head: RequestHead | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
        except CodecError as exc:
            if self.transport is not None:
                self.transport.write(local_response(exc.status, exc.message.encode(), close=True))
                self.transport.close()

    def on_request_head(self, head: RequestHead) -> None:
        self.head = head

    def on_request_body(self, chunk: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        head = self.head
        if head is None or self.transport is None:
            return
        auth = head.headers.get("authorization", "")
        status, body, ctype = self.admin.handle(head.method, head.path, auth)
        extra = [(b"www-authenticate", b'Bearer realm="diktyo-sidecar-admin"')]
        self.transport.write(
            local_response(
                status,
                body,
                extra if status == 401 else None,
                close=not head.keep_alive,
                content_type=ctype,
            )
        )
        if not head.keep_alive:
            self.transport.close()


class AdminServer:
    """Serves the sidecar's state; ``handle`` is plain code (tests call it directly too)."""

    def __init__(self, sidecar: Any, token: str | None = None, token_file: str = "") -> None:
        self.sidecar = sidecar
        self.server: asyncio.Server | None = None
        self.port = 0
        # the bearer token state-changing endpoints need; None = a random one nobody knows
        self.token = token if token else new_token()
        self.token_file = token_file  # named in 401 answers (where to find the token)

    async def start(self, address: str = "127.0.0.1", port: int = 0) -> int:
        loop = self.sidecar.loop
        try:  # an IPv4 address: bound here, since a name lookup (even of "127.0.0.1") loads
            socket.inet_pton(socket.AF_INET, address)  # the idna codec with unicodedata and
        except OSError:  # stringprep: ~0.4 MiB of idle RSS (issue 11)
            self.server = await loop.create_server(lambda: AdminConnection(self), address, port)
        else:
            sock = bind_listener(address, port, backlog=100)  # create_server's default backlog
            self.server = await loop.create_server(lambda: AdminConnection(self), sock=sock)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def authorized(self, authorization: str) -> bool:
        scheme, _, cred = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return compare_digest(cred.strip().encode(), self.token.encode())

    def handle(self, method: str, target: str, authorization: str = "") -> tuple[int, bytes, bytes]:
        path = target.split("?", 1)[0]
        sc = self.sidecar
        text = b"text/plain"
        js = b"application/json"
        if path in MUTATING and not self.authorized(authorization):
            where = f" (the token is in {self.token_file})" if self.token_file else ""
            log.warning("admin %s %s refused: missing or wrong bearer token", method, path)
            return (
                401,
                f"{method} {path} needs 'Authorization: Bearer TOKEN'{where}\n".encode(),
                text,
            )
        if path == "/ready":
            ok = (
                sc.rt is not None
                and not sc.draining
                and all(c.server is not None for c in sc.listeners.values())
            )
            return (200, b"LIVE\n", text) if ok else (503, b"NOT READY\n", text)
        if path in ("/stats/prometheus", "/metrics"):
            clusters = sc.rt.clusters if sc.rt is not None else {}
            body = sc.stats.render_prometheus(clusters).encode()
            return 200, body, b"text/plain; version=0.0.4"
        if path == "/stats":
            # Envoy's plain text stats ("cluster.<name>.<stat>: <value>"), which Istio's
            # circuit-breaking task greps; ?filter=REGEX like Envoy's admin
            clusters = sc.rt.clusters if sc.rt is not None else {}
            from urllib.parse import parse_qs  # (+ ipaddress): not in an idle sidecar

            query = parse_qs(target.split("?", 1)[1]) if "?" in target else {}
            try:  # RE2: linear time, so a hostile filter cannot stall the sidecar
                flt = compile_re2(query["filter"][0]) if "filter" in query else None
            except RegexError as exc:
                return 400, f"bad filter regex: {exc}\n".encode(), text
            lines = envoy_text_stats(sc.stats.render_prometheus(clusters))
            if flt is not None:
                lines = [ln for ln in lines if flt.search(ln.split(":", 1)[0])]
            return 200, "".join(ln + "\n" for ln in lines).encode(), text
        if path == "/config_dump":
            if sc.rt is None:
                return 503, b'{"error": "no snapshot applied yet"}\n', js
            return 200, msgspec.json.encode(sc.rt.snapshot) + b"\n", js
        if path == "/clusters":
            clusters = sc.rt.clusters if sc.rt is not None else {}
            out = []
            for name, cs in clusters.items():
                d = cs.describe()
                pool = sc.pools.get(name)
                if pool is not None:
                    d["pool"] = {
                        "protocol": pool.protocol,
                        "codec": getattr(pool, "codec", "httptools"),  # HTTP/2: nghttp2 or h2
                        "active_connections": len(pool.active),
                        "idle_connections": sum(len(v) for v in pool.idle.values()),
                        "pending": len(pool.pending),
                    }
                out.append(d)
            return 200, json.dumps({"clusters": out}, indent=1, default=str).encode(), js
        if path == "/listeners":
            return 200, json.dumps(sc.ports()).encode(), js
        if path == "/workers":  # concurrency N: each worker process (diktyo.proxy.workers)
            wk = getattr(sc, "workers", None)
            found = wk.describe(detail=True) if wk is not None else [{"worker": 0, "role": "leader"}]
            return 200, json.dumps({"workers": found}, indent=1).encode(), js
        if path == "/memory":  # RSS and which optional libraries are loaded (issue 11)
            return 200, json.dumps(memory.report(), indent=1).encode() + b"\n", js
        if path in ("/drain", "/quitquitquit", "/drain_listeners"):
            if method != "POST":
                return 405, b"use POST\n", text
            task = sc.loop.create_task(sc.drain())
            sc.tasks.add(task)
            task.add_done_callback(sc.tasks.discard)
            return 200, b"draining\n", text
        if path == "/":
            return 200, ROUTES_HELP.encode(), text
        return 404, ROUTES_HELP.encode(), text


_CLUSTER_LINE = re.compile(r'^envoy_cluster_(\w+)\{cluster_name="((?:[^"\\]|\\.)*)"\} (\S+)$')
_PLAIN_LINE = re.compile(r"^envoy_(http|server)_(\w+) (\S+)$")


def envoy_text_stats(prometheus_text: str) -> list[str]:
    """Envoy's ``/stats`` lines from the proxy's own ``envoy_*`` Prometheus series, sorted."""
    out = []
    for line in prometheus_text.splitlines():
        m = _CLUSTER_LINE.match(line)
        if m:
            stat, cluster, value = m.groups()
            out.append(f"cluster.{cluster}.{stat}: {_int(value)}")
            continue
        m = _PLAIN_LINE.match(line)
        if m:
            scope, stat, value = m.groups()
            out.append(f"{scope}.{stat}: {_int(value)}")
    return sorted(out)


def _int(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value
    return str(int(f)) if f.is_integer() else value

"""Who may call the control plane's HTTP API: admin credential, sidecar identity, browser guards.

Theory of operation
-------------------
One aiohttp middleware runs before every handler, in this order:

1. **Host** (DNS rebinding): the ``Host`` header must name 127.0.0.1, localhost, [::1], the
   address the control plane listens on, or a name passed in ``allowed_hosts``
   (``--allowed-host``, ``$DIKTYO_ALLOWED_HOSTS``); otherwise 403. A web page that rebinds
   its own name to 127.0.0.1 sends its own name as Host.
2. **Origin**: a request carrying an ``Origin`` (browsers add it to cross-site and to all
   non-GET requests) must come from this control plane's own origin; ``Sec-Fetch-Site:
   cross-site`` is refused too. 403 otherwise.
3. **Content type** of writes (POST/PUT/PATCH/DELETE with a body): JSON, YAML or OTLP
   protobuf; ``text/plain``, forms and a missing type get 415. These are the types a browser
   may send cross-site without a CORS preflight, which this server never grants.
4. **Credential**, by route:
   - open: ``/healthz``, dashboard static files, ``POST /v1/certificates`` (checks its own
     bootstrap token or, in a Kubernetes pod, the projected service-account token), ``POST /telemetry/v1/traces`` (sidecars' spans);
   - sidecar routes (``/v1/snapshot``, ``/v1/ack``, ``POST /v1/registry/proxies`` and
     ``/instances``, the ``/v1/registry/workloadentries`` WebSocket): the admin token, or a
     sidecar's bootstrap token (``Bearer``, HMAC-signed by this control plane,
     ``diktyo.control.ca.token``) or, in a Kubernetes pod, its projected service-account token
     (audience ``diktyo-ca``, checked with a TokenReview); the handler then checks that the
     node or instance belongs to the token's SPIFFE identity (namespace + service account);
   - everything else (config, registry, proxies, workloads, dashboard, telemetry API): the
     admin token as ``Authorization: Bearer`` or the dashboard's cookie. ``GET /?token=T``
     with the right token sets that cookie (HttpOnly, SameSite=Strict) and redirects to ``/``.
   A missing or wrong credential is a 401 whose message names the token file.
5. **TokenReview budget** (only where a ``token_reviewer`` is set, i.e. in a Kubernetes pod):
   each refused credential on a route that may ask the API server for a TokenReview (the
   sidecar routes and ``POST /v1/certificates``) spends one of a few refusals per source
   address (``ReviewLimiter``: 10 at once, one more per second); a source with none left gets
   429 with ``Retry-After`` before any review. Sidecars with good tokens are never refused,
   and their answers are cached, so they do not feel it. (The reviewer itself also refuses
   what cannot be a projected token before asking: ``ingest.kubernetes.token_shape_problem``.)
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from diktyo.control.ca.token import BootstrapTokens, TokenError
from diktyo.security.admin_token import COOKIE, token_path

ADMIN = "admin"  # request[PRINCIPAL] of a request with the admin credential
PRINCIPAL = web.RequestKey("principal", str)  # "admin" or a sidecar's SPIFFE id
UNVERIFIED = "unverified-sidecar"  # snapshot/ACK without a token, when sidecar auth is off
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]", "localhost.localdomain"})
_WRITE_TYPES = frozenset(
    {
        "application/json",
        "application/yaml",
        "application/x-yaml",
        "application/x-protobuf",
        "application/protobuf",
    }
)
_OPEN = ("/healthz", "/static/", "/v1/certificates", "/telemetry/v1/traces", "/favicon.ico")
_SIDECAR = (
    "/v1/snapshot",
    "/v1/ack",
    "/v1/registry/proxies",
    "/v1/registry/instances",
    "/v1/registry/workloadentries",  # auto-registration (control.autoregister)
)

# routes whose refusals may each have cost a TokenReview (in a Kubernetes pod)
_REVIEWED = (*_SIDECAR, "/v1/certificates")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _hostname(value: str) -> str:
    """``HOST[:PORT]`` / ``[v6]:PORT`` -> lower-case host without brackets and port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


class ReviewLimiter:
    """Refused credentials per source address, as token buckets: ``burst`` at once, then
    ``rate`` per second. At most ``sources`` addresses are remembered (the fullest buckets
    are forgotten first: forgetting one only gives it back its full budget)."""

    def __init__(
        self,
        burst: float = 10.0,
        rate: float = 1.0,
        sources: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.rate, self.sources, self.clock = burst, rate, sources, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)
        self.limited = 0  # requests answered 429 (stats, tests)

    def _level(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait(self, source: str) -> float:
        """0 if ``source`` may still be refused once more; else seconds until it may."""
        level = self._level(source, self.clock())
        if level >= 1.0:
            return 0.0
        self.limited += 1
        return (1.0 - level) / self.rate

    def refused(self, source: str) -> None:
        now = self.clock()
        self._buckets[source] = (self._level(source, now) - 1.0, now)
        if len(self._buckets) > self.sources:
            fullest = sorted(self._buckets, key=lambda k: self._level(k, now), reverse=True)
            for k in fullest[: len(self._buckets) - self.sources]:
                del self._buckets[k]


class AccessPolicy:
    """The checks above, for one control plane."""

    def __init__(
        self,
        admin_token: str,
        tokens: BootstrapTokens,
        *,
        allowed_hosts: Iterable[str] = (),
        token_file: str | Path | None = None,
        sidecar_auth: bool = True,
    ) -> None:
        self.admin_token = admin_token
        # off only where the network already confines who reaches the API (the Helm chart:
        # in-cluster sidecars have no diktyo bootstrap token yet); applies to snapshots/ACKs
        self.sidecar_auth = sidecar_auth
        self.check_host = True
        self.tokens = tokens
        env = os.environ.get("DIKTYO_ALLOWED_HOSTS", "")
        extra = [h for h in env.split(",") if h.strip()]
        self.allowed_hosts = set(_LOOPBACK) | {_hostname(h) for h in [*allowed_hosts, *extra]}
        self.token_file = Path(token_file) if token_file else None
        # in a Kubernetes pod: a sidecar's projected service-account token -> its SPIFFE id
        # (TokenReview, diktyo.control.ingest.kubernetes.TokenReviewer); None elsewhere
        self.token_reviewer: Callable[[str], Awaitable[str | None]] | None = None
        self.review_limit = ReviewLimiter()
        self.refused = {"host": 0, "origin": 0, "content_type": 0, "credential": 0}

    def allow_host(self, host: str) -> None:
        """Also accept ``host`` (the address the server listens on)."""
        name = _hostname(host)
        try:
            if ipaddress.ip_address(name).is_unspecified:
                # 0.0.0.0 / :: is not a name a client sends: listening on every address (a
                # pod), clients use names we cannot know, unless given with --allowed-host
                self.check_host = self.allowed_hosts != set(_LOOPBACK)
                return
        except ValueError:
            pass
        self.allowed_hosts.add(name)

    # ------------------------------------------------------------------ credentials

    def is_admin(self, request: web.Request) -> bool:
        token = _bearer(request) or request.cookies.get(COOKIE, "")
        return bool(token) and hmac.compare_digest(token.encode(), self.admin_token.encode())

    def sidecar_identity(self, request: web.Request) -> str | None:
        """The SPIFFE id proven by a bootstrap token, or None."""
        token = _bearer(request)
        if not token or not token.startswith("v1."):
            return None
        try:
            return self.tokens.verify(token)
        except TokenError:
            return None

    def _where(self) -> str:
        path = self.token_file or token_path()
        return str(path)

    def unauthorized(self, request: web.Request, why: str) -> web.Response:
        self.refused["credential"] += 1
        where = self._where()
        msg = (
            f"{why}: this control plane needs its admin credential. The diktyo CLI reads it "
            f"from {where} (mode 0600, created by 'diktyo up', 'demo' or 'control-plane'); "
            f"other clients send 'Authorization: Bearer $(cat {where})'; the dashboard link "
            "printed by 'diktyo demo'/'up' carries it"
        )
        return web.json_response(
            {"error": msg, "token_file": where},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="diktyo"'},
        )

    # ------------------------------------------------------------------ the middleware

    def middleware(self) -> Any:
        @web.middleware
        async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
            refusal = self._guard(request)
            if refusal is not None:
                return refusal
            path = request.path
            if (
                self.token_reviewer is not None
                and path.startswith(_REVIEWED)
                and not self.is_admin(request)
                and self.sidecar_identity(request) is None
            ):
                # each refusal here may have cost a TokenReview: a budget per source (the
                # admin and bootstrap tokens are checked here, at no cost, and not limited)
                source = request.remote or ""
                wait = self.review_limit.wait(source)
                if wait > 0:
                    return _too_many(source, wait)
                resp = await self._check(request, handler, path)
                if resp.status == 401:
                    self.review_limit.refused(source)
                return resp
            return await self._check(request, handler, path)

        return access

    async def _check(self, request: web.Request, handler: Handler, path: str) -> web.StreamResponse:
        """Step 4 (the credential), then the handler."""
        if path.startswith(_OPEN) or path == "/healthz":
            return await handler(request)
        if self.is_admin(request):
            request[PRINCIPAL] = ADMIN
            return await handler(request)
        if path.startswith(_SIDECAR) and request.method in ("GET", "POST"):
            identity = self.sidecar_identity(request)
            token = _bearer(request)
            if identity is None and self.token_reviewer is not None and token:
                identity = await self.token_reviewer(token)
            if identity is not None:
                request[PRINCIPAL] = identity
                return await handler(request)
            if not self.sidecar_auth and path in ("/v1/snapshot", "/v1/ack"):
                request[PRINCIPAL] = UNVERIFIED
                return await handler(request)
            return self.unauthorized(
                request, "no valid admin credential or sidecar bootstrap token"
            )
        given = request.query.get("token")
        if (
            given is not None
            and request.method == "GET"
            and path in ("/", "/dashboard")
            and hmac.compare_digest(given.encode(), self.admin_token.encode())
        ):
            # keep the token in a cookie and drop it from the address bar
            rest = request.rel_url.without_query_params("token")
            resp = web.Response(status=302, headers={"Location": str(rest)})
            resp.set_cookie(COOKIE, given, httponly=True, samesite="Strict", path="/")
            return resp
        return self.unauthorized(request, "missing or wrong admin credential")

    def _guard(self, request: web.Request) -> web.Response | None:
        host = _hostname(request.headers.get("Host", ""))
        if self.check_host and host not in self.allowed_hosts:
            self.refused["host"] += 1
            return web.json_response(
                {
                    "error": f"unexpected Host header {host!r}: this control plane answers only "
                    "to 127.0.0.1, localhost, [::1] and the names given with --allowed-host "
                    "or $DIKTYO_ALLOWED_HOSTS (protection against DNS rebinding)"
                },
                status=403,
            )
        origin = request.headers.get("Origin")
        if origin is not None and not self._same_origin(origin, request):
            self.refused["origin"] += 1
            return web.json_response(
                {"error": f"cross-origin request from {origin!r} refused"}, status=403
            )
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            self.refused["origin"] += 1
            return web.json_response({"error": "cross-site request refused"}, status=403)
        if (
            request.method in ("POST", "PUT", "PATCH", "DELETE")
            and request.body_exists
            and request.content_type not in _WRITE_TYPES
        ):
            self.refused["content_type"] += 1
            return web.json_response(
                {
                    "error": f"content type {request.content_type!r} refused on writes: send "
                    "application/json (or application/yaml for Istio YAML)"
                },
                status=415,
            )
        return None

    def _same_origin(self, origin: str, request: web.Request) -> bool:
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed frames, file://) included
        if _hostname(parts.hostname) not in self.allowed_hosts:
            return False
        own = request.url.port
        return (port or (443 if parts.scheme == "https" else 80)) == own


def _too_many(source: str, wait: float) -> web.Response:
    seconds = max(1, math.ceil(wait))
    return web.json_response(
        {
            "error": f"too many refused credentials from {source}: each may cost the Kubernetes "
            f"API server a TokenReview; try again in {seconds} s with a valid token (a "
            "sidecar's projected service-account token, audience diktyo-ca)",
            "retry_after": seconds,
        },
        status=429,
        headers={"Retry-After": str(seconds)},
    )


def _bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""

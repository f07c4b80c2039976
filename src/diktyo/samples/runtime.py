"""Shared runtime of the sample apps: settings from env, access log, header propagation, serving until SIGTERM.

Every sample app (Bookinfo's productpage, details, reviews, ratings and httpbin) is an aiohttp
application run by :func:`run`. What an app reads from its environment:

``PORT``             port to listen on (``0``: any free port; the chosen one is printed)
``BIND_ADDRESS``     address to listen on, default ``127.0.0.1`` (not ``HOST``: zsh sets that)
``SERVICE_NAME``     e.g. ``reviews`` (defaults to the app's own name)
``SERVICE_VERSION``  e.g. ``v2`` (default ``v1``)
``POD_NAME``         instance name shown to users, e.g. ``reviews-v2-1``
                     (default ``<SERVICE_NAME>-<SERVICE_VERSION>``)
``LOG_REQUESTS``     ``0`` turns the one-line-per-request log off (default on)
``HTTP_PROXY``       outgoing calls go through it (the sidecar); ``NO_PROXY`` is honoured

On start an app prints ``<pod> listening on http://HOST:PORT`` (one line, flushed), which is
how launchers learn that it is ready and which port it got when ``PORT=0``. SIGTERM or SIGINT
stop it cleanly (in-flight requests get up to 2 s), exit code 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

# Headers Istio's docs ask every application to copy from its incoming request onto its
# outgoing calls, so that a trace spans the whole call graph (Bookinfo's list).
TRACE_HEADERS: tuple[str, ...] = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
)
# Also copied by Bookinfo's apps: the user agent and credentials (for end-user auth tasks).
CONTEXT_HEADERS: tuple[str, ...] = ("user-agent", "cookie", "authorization", "jwt")


class ConfigError(Exception):
    """A bad environment variable; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What a sample app learns from its environment."""

    service: str
    version: str
    pod: str
    host: str = "127.0.0.1"
    port: int = 9080
    log_requests: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, service: str, default_port: int) -> Settings:
        raw_port = env.get("PORT", "").strip() or str(default_port)
        try:
            port = int(raw_port)
        except ValueError:
            raise ConfigError(
                f"PORT must be a port number to listen on (0 for any free port), got {raw_port!r}"
            ) from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"PORT must be between 0 and 65535, got {port}")
        name = env.get("SERVICE_NAME", "").strip() or service
        version = env.get("SERVICE_VERSION", "").strip() or "v1"
        pod = env.get("POD_NAME", "").strip() or f"{name}-{version}"
        return cls(
            service=name,
            version=version,
            pod=pod,
            host=env.get("BIND_ADDRESS", "").strip() or "127.0.0.1",
            port=port,
            log_requests=env.get("LOG_REQUESTS", "1").strip().lower() not in ("0", "false", "no"),
        )


SETTINGS_KEY = web.AppKey("settings", Settings)
CLIENT_KEY = web.AppKey("client", aiohttp.ClientSession)


def env_url(env: Mapping[str, str], name: str, default: str) -> str:
    """A base URL from env (e.g. ``REVIEWS_URL``), without a trailing slash."""
    value = env.get(name, "").strip() or default
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be a URL like {default}, got {value!r}")
    return value.rstrip("/")


def propagated(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """The headers among ``names`` present in ``headers`` (a case-insensitive mapping)."""
    out: dict[str, str] = {}
    for name in names:
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out


def _access_log(settings: Settings) -> Callable[..., Awaitable[web.StreamResponse]]:
    out = sys.stdout

    @web.middleware
    async def access_log(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            ms = (time.monotonic() - start) * 1000.0
            out.write(f"{settings.pod} {request.method} {request.path_qs} {status} {ms:.1f}ms\n")
            out.flush()

    return access_log


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    # trust_env: HTTP_PROXY / NO_PROXY decide whether a call goes through the sidecar.
    session = aiohttp.ClientSession(trust_env=True)
    app[CLIENT_KEY] = session
    yield
    await session.close()


def new_app(settings: Settings, *, client: bool = False) -> web.Application:
    """An aiohttp app with the access log, ``/health``, and (if ``client``) a proxy-aware session."""
    middlewares = [_access_log(settings)] if settings.log_requests else []
    app = web.Application(middlewares=middlewares)
    app[SETTINGS_KEY] = settings
    if client:
        app.cleanup_ctx.append(_client_ctx)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": f"{settings.service} is healthy"})

    app.router.add_get("/health", health)
    return app


async def serve(app: web.Application, settings: Settings) -> int:
    """Serve ``app`` on ``settings.host:port`` until SIGTERM/SIGINT; the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(
            f"{settings.pod}: cannot listen on {settings.host}:{settings.port}: {exc.strerror}; "
            "set PORT to a free port (or 0 for any free port)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    host, port = runner.addresses[0][:2]
    print(f"{settings.pod} listening on http://{host}:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()
    print(f"{settings.pod} stopped", flush=True)
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but apps run without it
        return None
    return uvloop.new_event_loop


def run(make_app: Callable[[Settings], web.Application], *, service: str, default_port: int) -> int:
    """Entry point of a sample app: settings from ``os.environ``, serve until SIGTERM."""
    try:
        settings = Settings.from_env(os.environ, service=service, default_port=default_port)
        app = make_app(settings)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(app, settings))

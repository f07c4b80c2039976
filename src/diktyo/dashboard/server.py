"""The dashboard's web routes: static UI plus a small JSON API over a ``DashboardBackend``.

The control plane owns the data (embedded metric and trace stores, config, sidecar state) and
passes an object implementing ``DashboardBackend``; this module only serves it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

STATIC = Path(__file__).parent / "static"


class DashboardBackend(Protocol):
    """What the dashboard asks of the control plane. Shapes: docs/observability-cli.md."""

    # graph, services and series: the value, or an awaitable of it (Prometheus is asked
    # asynchronously, the embedded store answers at once)
    def graph(self, window: float) -> Any: ...
    def services(self) -> Any: ...
    def series(self, service: str, window: float, source: str | None = None) -> Any: ...
    def traces(
        self, service: str | None, min_ms: float, errors: bool, limit: int
    ) -> list[dict[str, Any]]: ...
    def trace(self, trace_id: str) -> dict[str, Any] | None: ...
    def config(self) -> dict[str, Any]: ...
    def resilience(self) -> Any: ...  # list[dict] or an awaitable of it


def _float(req: web.Request, name: str, default: float) -> float:
    try:
        return float(req.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be a number") from None


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def setup_dashboard(app: web.Application, backend: DashboardBackend, prefix: str = "") -> None:
    """Mount the UI at ``prefix + '/'`` and its API at ``prefix + '/api/...'``."""

    async def index(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def graph(req: web.Request) -> web.Response:
        return web.json_response(await _maybe_await(backend.graph(_float(req, "window", 300.0))))

    async def services(_: web.Request) -> web.Response:
        return web.json_response(await _maybe_await(backend.services()))

    async def series(req: web.Request) -> web.Response:
        service = req.query.get("service", "")
        if not service:
            raise web.HTTPBadRequest(text="query parameter 'service' is required")
        window = _float(req, "window", 900.0)
        source = req.query.get("source") or None
        if source:
            return web.json_response(await _maybe_await(backend.series(service, window, source)))
        return web.json_response(await _maybe_await(backend.series(service, window)))

    async def traces(req: web.Request) -> web.Response:
        result = backend.traces(
            req.query.get("service") or None,
            _float(req, "min_ms", 0.0),
            req.query.get("errors", "0") in ("1", "true"),
            int(_float(req, "limit", 50)),
        )
        return web.json_response(result)

    async def trace(req: web.Request) -> web.Response:
        found = backend.trace(req.match_info["trace_id"])
        if found is None:
            raise web.HTTPNotFound(text="no such trace (traces are kept for a bounded time)")
        return web.json_response(found)

    async def config(_: web.Request) -> web.Response:
        return web.json_response(backend.config())

    async def resilience(_: web.Request) -> web.Response:
        return web.json_response(await _maybe_await(backend.resilience()))

    app.router.add_get(prefix + "/", index)
    app.router.add_get(prefix + "/dashboard", index)
    app.router.add_static(prefix + "/static/", STATIC, name="dashboard-static")
    app.router.add_get(prefix + "/api/graph", graph)
    app.router.add_get(prefix + "/api/services", services)
    app.router.add_get(prefix + "/api/series", series)
    app.router.add_get(prefix + "/api/traces", traces)
    app.router.add_get(prefix + "/api/traces/{trace_id}", trace)
    app.router.add_get(prefix + "/api/config", config)
    app.router.add_get(prefix + "/api/resilience", resilience)

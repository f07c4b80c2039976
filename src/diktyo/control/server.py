"""The control plane: config store + live registry -> translate -> long-poll push, over HTTP.

Theory of operation
-------------------
Every change (a config file, ``diktyo apply``, an instance joining, leaving or failing its
health check, a proxy registering) calls ``kick()``. The push loop debounces (100 ms quiet,
10 s max, ``serve.debounce``), builds one immutable ``PushContext``, translates every known
proxy and encodes each changed snapshot once (``serve.cache``), then wakes the long polls of
the proxies whose version changed. Sidecars poll ``GET /v1/snapshot`` and answer ``POST
/v1/ack``; ``serve.status`` keeps the ACK/NACK bookkeeping behind ``diktyo proxy-status``.

``ControlPlane`` holds the state (config store, registry, proxies, identity, store backend)
and composes the parts, each with its own routes on one aiohttp application (``app``):

- ``serve.push.PushServer``: push loop, snapshot cache, long poll and ACK, ``/v1/proxies``;
- ``serve.config_api.ConfigApi``: ``/v1/config`` (apply, delete, analysis), ``/v1/replicas``;
- ``serve.registry_api.RegistryApi``: ``/v1/registry/...``, ``/v1/workloads``, ``/v1/tokens``;
- ``serve.health.HealthChecker``: probing instances' sidecars, ``/healthz``;
- ``serve.observability.Observability``: metric/trace stores, scraping, ``/telemetry``, and
  the data the dashboard reads. The dashboard mounts itself on ``app``
  (``diktyo.dashboard.mount(cp)``, called by whoever composes the program); this package
  never imports it.

It runs inside any asyncio program (``diktyo up`` hosts it in-process) or alone (``diktyo
control-plane``). HTTP API: see ``docs/mesh-file.md`` ("Control plane API").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from diktyo.control.auth import ADMIN, PRINCIPAL, UNVERIFIED, AccessPolicy
from diktyo.control.backend import EmbeddedBackend, StoreBackend
from diktyo.control.ca.mesh import MeshIdentity
from diktyo.control.model import ProxyNode, PushContext, Registry
from diktyo.control.serve.cache import SnapshotCache, Translator
from diktyo.control.serve.config_api import ConfigApi
from diktyo.control.serve.debounce import Debouncer
from diktyo.control.serve.health import HealthChecker, HealthTracker
from diktyo.control.serve.http import error
from diktyo.control.serve.observability import Observability
from diktyo.control.serve.push import PushServer
from diktyo.control.serve.registry import LiveRegistry
from diktyo.control.serve.registry_api import RegistryApi
from diktyo.control.serve.status import ProxyStatus
from diktyo.control.store import ConfigStore, resource_key
from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.security.admin_token import new_token as new_admin_token
from diktyo.snapshot.codec import to_builtins
from diktyo.snapshot.model import MeshConfig

log = logging.getLogger(__name__)

_PLACEHOLDER_PAGE = """<!doctype html><html><head><title>diktyo</title></head><body>
<h1>diktyo control plane</h1><p>No dashboard is mounted. JSON API:
<a href="/v1/proxies">/v1/proxies</a>, <a href="/v1/registry">/v1/registry</a>,
<a href="/v1/config">/v1/config</a>.</p></body></html>"""


class ControlPlane:
    """In-process control plane. ``await start()`` serves HTTP; ``await stop()`` ends every task."""

    def __init__(
        self,
        *,
        config_dir: str | Path | None = None,
        translator: Translator | None = None,
        mesh: MeshConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        debounce: float = 0.1,
        debounce_max: float = 10.0,
        poll_timeout: float = 25.0,
        health_interval: float = 1.0,
        store: ConfigStore | None = None,
        merge_service_entries: bool = False,  # translate merges ServiceEntries itself
        observability: bool = True,
        scrape_interval: float = 5.0,
        prometheus_url: str | None = None,
        admin_token: str | None = None,
        admin_token_file: str | Path | None = None,
        allowed_hosts: tuple[str, ...] = (),
        token_key: bytes | None = None,
        sidecar_auth: bool = True,
        backend: StoreBackend | None = None,
    ) -> None:
        self.clock = clock
        self.mesh = mesh or MeshConfig()
        self.store = store or ConfigStore(config_dir)
        self.store.on_change = self.kick
        self.registry = LiveRegistry(on_change=self.kick)
        self.proxies: dict[str, ProxyNode] = {}
        self.push = PushServer(self, translator or _LazyTranslator(), debounce, debounce_max)
        # where config, registry and CA live: in memory (default) or etcd (control/backend.py)
        self.backend: StoreBackend = backend or EmbeddedBackend()
        self.backend.attach(self)  # may replace self.registry by a write-through one
        self.poll_timeout = poll_timeout
        self.health_interval = health_interval
        self.health = HealthTracker()
        self.merge_service_entries = merge_service_entries
        self.workloads_provider: Callable[[], list[dict[str, Any]]] | None = None
        self.url = ""
        self.admin_urls: dict[str, str] = {}  # node id -> sidecar admin base URL (scraping)
        # embedded metric/trace stores, scraping, /telemetry; what the dashboard reads
        self.observability = (
            Observability(self, scrape_interval, prometheus_url) if observability else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        # workload identities: the CA and bootstrap tokens (POST /v1/certificates)
        self.identity = MeshIdentity(self.mesh.trust_domain, clock, token_key=token_key)
        # the admin credential (CLI, dashboard); random unless the platform passes the one of
        # $DIKTYO_HOME/admin-token. Sidecars prove themselves with their bootstrap token.
        self.admin_token = admin_token or new_admin_token()
        self.access = AccessPolicy(
            self.admin_token,
            self.identity.tokens,
            allowed_hosts=allowed_hosts,
            token_file=admin_token_file,
            sidecar_auth=sidecar_auth,
        )
        # WorkloadEntry auto-registration (``diktyo join``): its WebSocket route and sweep task
        from diktyo.control.autoregister import AutoRegistrar

        self.autoregister = AutoRegistrar(self)
        self.health_checker = HealthChecker(self, self.health)
        self.app = self._make_app()

    # ------------------------------------------------------------------ the parts' state
    # (what callers and tests read on the control plane itself; the rest is on ``push``,
    # ``observability``, ``health_checker``)

    @property
    def cache(self) -> SnapshotCache:
        return self.push.cache

    @property
    def debouncer(self) -> Debouncer:
        return self.push.debouncer

    @property
    def status(self) -> dict[str, ProxyStatus]:
        return self.push.status

    @property
    def pushes(self) -> int:
        return self.push.pushes

    @property
    def metrics(self) -> Any:
        """The embedded ``MetricStore`` (None without observability)."""
        return self.observability.metrics if self.observability else None

    @property
    def traces(self) -> Any:
        """The embedded ``TraceStore`` (None without observability)."""
        return self.observability.traces if self.observability else None

    @property
    def metric_source(self) -> Any:
        """What the dashboard reads metrics from: ``metrics`` or Prometheus."""
        return self.observability.metric_source if self.observability else None

    @property
    def _scraper(self) -> Any:  # tests drive scrape rounds through it
        return self.observability.scraper if self.observability else None

    # ------------------------------------------------------------------ state changes

    def admin_headers(self) -> dict[str, str]:
        """``Authorization`` header carrying the admin credential (for in-process callers)."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def sidecar_token(self, proxy: ProxyNode, ttl: float = 3600.0) -> str:
        """A bootstrap token for ``proxy``'s identity (what the platform gives each sidecar)."""
        return self.identity.token_for(proxy.node.namespace, proxy.node.service_account, ttl)

    def may_act_for(self, request: web.Request, namespace: str, service_account: str) -> bool:
        """Admin, or a sidecar whose proven SPIFFE id is this namespace + service account."""
        principal = request.get(PRINCIPAL)
        if principal in (ADMIN, UNVERIFIED):  # UNVERIFIED: snapshot/ACK only
            return True
        return principal == self.identity.spiffe_id(namespace, service_account)

    def forbidden(self, request: web.Request, what: str) -> web.Response:
        principal = request.get(PRINCIPAL) or "anonymous"
        log.warning("refused: %s may not act for %s", principal, what)
        return error(
            403,
            f"{principal} may not act for {what}: a sidecar's bootstrap token is good only for "
            "its own workload (namespace and service account)",
        )

    def kick(self) -> None:
        """Something changed: schedule a (debounced) push."""
        self.push.kick()

    def add_proxy(self, proxy: ProxyNode, admin_url: str | None = None) -> None:
        """Register a proxy; ``admin_url`` lets the control plane scrape its metrics."""
        if admin_url:
            self.admin_urls[proxy.node.id] = admin_url.rstrip("/")
        self.proxies[proxy.node.id] = proxy
        self.push.status.setdefault(proxy.node.id, ProxyStatus(proxy.node.id))
        self.backend.proxy_changed(proxy.node.id)  # shared with the other replicas (etcd)
        self.push.push_now(only_new=True)
        self.kick()

    def remove_proxy(self, node_id: str) -> bool:
        self.admin_urls.pop(node_id, None)
        if self.proxies.pop(node_id, None) is None:
            return False
        self.backend.proxy_changed(node_id)
        self.push.forget(node_id)
        return True

    def registry_source(self, name: str) -> Callable[[Registry], Awaitable[None]]:
        """A callback that replaces the registry of an external source, e.g.
        ``KubeWatcher(on_registry=cp.registry_source("kubernetes"))``."""

        async def publish(registry: Registry) -> None:
            self.registry.set_source(name, registry)

        return publish

    def config_source(self, name: str) -> Callable[[Any], Awaitable[None]]:
        """A callback taking a ``LoadResult`` (resources, errors) from an external config
        source, e.g. ``KubeWatcher(on_config=cp.config_source("kubernetes"))``."""

        async def publish(result: Any) -> None:
            self.store.set_source(name, result.resources, result.errors)

        return publish

    def push_now(self, only_new: bool = False) -> list[str]:
        """Build a PushContext and translate now (no debounce); return changed node ids."""
        return self.push.push_now(only_new)

    async def push_async(self, chunk: int = 25) -> int:
        """Translate in a worker thread, ``chunk`` proxies at a time (``PushServer.push_async``)."""
        return await self.push.push_async(chunk)

    async def sync(self, timeout: float = 10.0) -> bool:
        """Push now and wait until every proxy ACKed (or NACKed) its newest version."""
        return await self.push.sync(timeout)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if not self.app.frozen and not _serves_root(self.app):
            self.app.router.add_get("/", _h_placeholder)  # no dashboard mounted
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        # every sidecar holds a long poll open: a deep accept queue keeps a restart or a burst
        # of thousands of connects from overflowing it (the kernel caps it at somaxconn)
        site = web.TCPSite(self._runner, host, port, backlog=4096)
        await site.start()
        self.access.allow_host(host)
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        real_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://{host}:{real_port}"
        if self.observability is not None and self.mesh.tracing.otlp_endpoint is None:
            # sidecars export spans to the embedded trace store, as a path: each sidecar sends
            # them to the address it reaches this control plane by (a sidecar in a network
            # namespace reaches it through the bridge, not at self.url's 127.0.0.1)
            tracing = msgspec.structs.replace(
                self.mesh.tracing, otlp_endpoint="/telemetry/v1/traces"
            )
            self.mesh = msgspec.structs.replace(self.mesh, tracing=tracing)
        if self.store.directory is not None:
            self.store.reload_files(force=True)
            if self.store.errors:
                log.warning("starting with config errors:\n  %s", "\n  ".join(self.store.errors))
        try:
            await self.backend.start()  # the stored state (etcd) before the first push
        except BaseException:
            await self._runner.cleanup()
            await self._session.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            self.push.start(),
            loop.create_task(self.health_checker.run(self._session), name="cp-health"),
            loop.create_task(self.autoregister.run(), name="cp-autoregister"),
        ]
        if self.store.directory is not None:
            self._tasks.append(loop.create_task(self.store.watch(), name="cp-watch"))
        if self.observability is not None:
            self.observability.start()
        log.info("control plane serving on %s", self.url)
        return self.url

    async def stop(self) -> None:
        self.push.closing = True
        await self.backend.stop()
        if self.observability is not None:
            await self.observability.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.push.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        # the trace store stays open: a stopped control plane can be started again (a restart
        # keeps the recent traces); close() releases it for good

    def close(self) -> None:
        """Release the embedded stores once this control plane will not be started again."""
        if self.observability is not None:
            self.observability.close()

    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=16 * 1024 * 1024, middlewares=[self.access.middleware()]
        )
        app.add_routes(self.health_checker.routes())
        app.add_routes(self.push.routes())
        app.add_routes(ConfigApi(self).routes())
        app.add_routes(RegistryApi(self).routes())
        app.add_routes(self.identity.routes())
        app.add_routes(self.autoregister.routes())
        if self.observability is not None:
            self.observability.mount(app)
        return app


class _LazyTranslator:
    """Import the real translator on first use, so the server starts without it in tests."""

    def __init__(self) -> None:
        self._fn: Any = None

    def __call__(self, proxy: ProxyNode, push: PushContext) -> Any:
        return self.build(proxy, push).snapshot

    def build(self, proxy: ProxyNode, push: PushContext) -> Any:
        """Snapshot and its pre-encoded wire twin (``PushTranslator.build``)."""
        if self._fn is None:
            from diktyo.control.translate.cache import PushTranslator

            self._fn = PushTranslator()
        return self._fn.build(proxy, push)


def _serves_root(app: web.Application) -> bool:
    return any(r.canonical == "/" for r in app.router.resources())


async def _h_placeholder(request: web.Request) -> web.Response:
    return web.Response(text=_PLACEHOLDER_PAGE, content_type="text/html")


__all__ = ["ControlPlane", "resource_key", "to_builtins"]

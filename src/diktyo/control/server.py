"""The control plane server: config store + live registry -> translate -> long-poll push, over HTTP.

Theory of operation
-------------------
Every change (a config file, ``diktyo apply``, an instance joining, leaving or failing its
health check, a proxy registering) calls ``kick()``. The push loop debounces (100 ms quiet,
10 s max, ``serve.debounce``), builds one immutable ``PushContext``, translates every known
proxy and encodes each changed snapshot once (``serve.cache``), then wakes the long polls of
the proxies whose version changed. Sidecars poll ``GET /v1/snapshot`` and answer ``POST
/v1/ack``; ``serve.status`` keeps the ACK/NACK bookkeeping behind ``diktyo proxy-status``.

``ControlPlane`` runs inside any asyncio program (``diktyo up`` hosts it in-process) or alone
(``diktyo control-plane``). HTTP API: see ``docs/mesh-file.md`` ("Control plane API").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from diktyo.api.limits import ParseLimitError, check_json, decode_json
from diktyo.control.auth import ADMIN, PRINCIPAL, UNVERIFIED, AccessPolicy
from diktyo.control.backend import EmbeddedBackend, StoreBackend, StoreConflict, StoreUnavailable
from diktyo.control.ca.mesh import MeshIdentity
from diktyo.control.model import ProxyNode, PushContext, Registry, Service, WorkloadInstance
from diktyo.control.serve.cache import SnapshotCache, Translator
from diktyo.control.serve.debounce import Debouncer
from diktyo.control.serve.health import HealthTracker
from diktyo.control.serve.registry import LiveRegistry
from diktyo.control.serve.status import ProxyStatus
from diktyo.control.store import ConfigStore, StoreView, resource_key
from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.security.admin_token import new_token as new_admin_token
from diktyo.snapshot.codec import to_builtins
from diktyo.snapshot.model import MeshConfig

log = logging.getLogger(__name__)

_PLACEHOLDER_PAGE = """<!doctype html><html><head><title>diktyo</title></head><body>
<h1>diktyo control plane</h1><p>The dashboard is not built yet. JSON API:
<a href="/v1/proxies">/v1/proxies</a>, <a href="/v1/registry">/v1/registry</a>,
<a href="/v1/config">/v1/config</a>.</p></body></html>"""


def _default_translator() -> Any:
    """``translate`` sharing per-view work across proxies (``translate.cache.PushTranslator``)."""
    from diktyo.control.translate.cache import PushTranslator

    return PushTranslator()


def _merge_service_entries(resources: tuple[Any, ...], registry: Registry) -> Registry:
    """Add services/instances declared by ServiceEntry resources (config engineer's helper)."""
    try:
        from diktyo.control.translate import registry_from_service_entries
    except ImportError:
        return registry
    extra = registry_from_service_entries(resources)
    return Registry(
        services=registry.services + tuple(extra.services),
        instances=registry.instances + tuple(extra.instances),
    )


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
        # where config, registry and CA live: in memory (default) or etcd (control/backend.py)
        self.backend: StoreBackend = backend or EmbeddedBackend()
        self.backend.attach(self)  # may replace self.registry by a write-through one
        self.cache = SnapshotCache(translator or _LazyTranslator())
        self.debouncer = Debouncer(debounce, debounce_max)
        self.poll_timeout = poll_timeout
        self.health_interval = health_interval
        self.health = HealthTracker()
        self.merge_service_entries = merge_service_entries
        self.proxies: dict[str, ProxyNode] = {}
        self.status: dict[str, ProxyStatus] = {}
        self.push_version = 0
        self.pushes = 0
        self.last_push: PushContext | None = None
        self.analysis: list[str] = []
        self.analysis_raw: list[Any] = []
        self.workloads_provider: Callable[[], list[dict[str, Any]]] | None = None
        self.url = ""
        self.admin_urls: dict[str, str] = {}  # node id -> sidecar admin base URL (scraping)
        self.scrape_interval = scrape_interval
        # the dashboard reads graph/series from this Prometheus instead of the embedded store
        # ('--prometheus URL'; $DIKTYO_PROMETHEUS lets 'diktyo up' pass it to its mesh)
        self.prometheus_url = prometheus_url or os.environ.get("DIKTYO_PROMETHEUS") or None
        self.metric_source: Any = None  # what the dashboard reads: self.metrics or Prometheus
        self.metrics: Any = None  # diktyo.telemetry.store.MetricStore when observability is on
        self.traces: Any = None
        self._scraper: Any = None
        self._observability = observability
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._closing = False
        self._apply_lock = asyncio.Lock()
        self._kick = asyncio.Event()
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
        self.app = self._make_app()

    # ------------------------------------------------------------------ state changes

    def admin_headers(self) -> dict[str, str]:
        """``Authorization`` header carrying the admin credential (for in-process callers)."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def sidecar_token(self, proxy: ProxyNode, ttl: float = 3600.0) -> str:
        """A bootstrap token for ``proxy``'s identity (what the platform gives each sidecar)."""
        return self.identity.token_for(proxy.node.namespace, proxy.node.service_account, ttl)

    def _may_act_for(self, request: web.Request, namespace: str, service_account: str) -> bool:
        """Admin, or a sidecar whose proven SPIFFE id is this namespace + service account."""
        principal = request.get(PRINCIPAL)
        if principal in (ADMIN, UNVERIFIED):  # UNVERIFIED: snapshot/ACK only
            return True
        return principal == self.identity.spiffe_id(namespace, service_account)

    def _forbidden(self, request: web.Request, what: str) -> web.Response:
        principal = request.get(PRINCIPAL) or "anonymous"
        log.warning("refused: %s may not act for %s", principal, what)
        return _error(
            403,
            f"{principal} may not act for {what}: a sidecar's bootstrap token is good only for "
            "its own workload (namespace and service account)",
        )

    def kick(self) -> None:
        """Something changed: schedule a (debounced) push."""
        self.debouncer.change(self.clock.monotonic())
        self._kick.set()

    def add_proxy(self, proxy: ProxyNode, admin_url: str | None = None) -> None:
        """Register a proxy; ``admin_url`` lets the control plane scrape its metrics."""
        if admin_url:
            self.admin_urls[proxy.node.id] = admin_url.rstrip("/")
        self.proxies[proxy.node.id] = proxy
        self.status.setdefault(proxy.node.id, ProxyStatus(proxy.node.id))
        self.backend.proxy_changed(proxy.node.id)  # shared with the other replicas (etcd)
        self.push_now(only_new=True)
        self.kick()

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

    def remove_proxy(self, node_id: str) -> bool:
        self.admin_urls.pop(node_id, None)
        if self.proxies.pop(node_id, None) is None:
            return False
        self.backend.proxy_changed(node_id)
        self.status.pop(node_id, None)
        self.cache.drop(node_id)
        for fut in self._waiters.pop(node_id, set()):
            if not fut.done():
                fut.set_result(None)
        return True

    def push_now(self, only_new: bool = False) -> list[str]:
        """Build a PushContext and translate now (no debounce); return changed node ids."""
        if only_new:
            proxies = [p for p in self._served() if self.cache.get(p.node.id) is None]
            push = self._push_context()  # current state; same push version, new digest
        else:
            push = self._next_push()
            proxies = self._served()
        return self._publish(self.cache.rebuild(push, proxies))

    def _served(self) -> list[ProxyNode]:
        """The proxies this control plane translates: all of them, or (replicas on etcd) those
        long-polling this replica; the others' cached snapshots are dropped, so a sidecar that
        comes back is translated afresh on its first poll."""
        serves = self.backend.serves
        out = []
        for node_id, proxy in self.proxies.items():
            if serves(node_id):
                out.append(proxy)
            else:
                self.cache.drop(node_id)
        return out

    async def push_async(self, chunk: int = 25) -> int:
        """Like ``push_now``, but analysis and translation run in a worker thread, ``chunk``
        proxies at a time: the event loop keeps answering long polls, ACKs and ``/healthz``
        while a large config is translated, and proxies already translated get their snapshot
        while the rest are still being translated."""
        push = self._next_push(analyze=False)
        version = self.push_version
        await asyncio.to_thread(self._analyze, push)
        proxies = self._served()
        changed = 0
        for i in range(0, len(proxies), chunk):
            if self.push_version != version:
                break  # a newer push (push_now) already covered every proxy
            batch = [p for p in proxies[i : i + chunk] if p.node.id in self.proxies]
            built = await asyncio.to_thread(self.cache.compute, push, batch)
            if self.push_version != version:
                break  # superseded while translating: do not install older snapshots
            built = [b for b in built if b.node_id in self.proxies]
            changed += len(self._publish(self.cache.install(push, built)))
        return changed

    def _next_push(self, analyze: bool = True) -> PushContext:
        self.push_version += 1
        push = self._push_context()
        self.last_push = push
        self.pushes += 1
        if analyze:
            self._analyze(push)
        return push

    def _publish(self, changed: list[str]) -> list[str]:
        for node_id in changed:
            entry = self.cache.get(node_id)
            st = self.status.get(node_id)
            if entry is not None and st is not None:
                st.current = entry.version
            for fut in self._waiters.pop(node_id, set()):
                if not fut.done():
                    fut.set_result(None)
        return changed

    async def sync(self, timeout: float = 10.0) -> bool:
        """Push now and wait until every proxy ACKed (or NACKed) its newest version."""
        self.debouncer.fire()
        self.push_now()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(s.state in ("SYNCED", "NACK") for s in self.status.values()):
                return True
            await asyncio.sleep(0.02)
        return False

    def _push_context(self) -> PushContext:
        resources = self.store.resources
        registry = self.registry.view()
        if self.merge_service_entries:
            try:
                registry = _merge_service_entries(resources, registry)
            except Exception:
                log.warning("ServiceEntry registry merge failed", exc_info=True)
        return PushContext(resources, registry, self.mesh, str(self.push_version))

    def _analyze(self, push: PushContext) -> None:
        try:
            from diktyo.control.validate import analyze  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            return
        try:
            self.analysis_raw = list(analyze(push.resources, push.registry))
            self.analysis = [str(m) for m in self.analysis_raw]
        except Exception as exc:  # noqa: BLE001 - a validator bug must not stop pushes
            self.analysis = [f"analyze failed: {type(exc).__name__}: {exc}"]

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._kick = asyncio.Event()
        self._closing = False
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
        if self.traces is not None and self.mesh.tracing.otlp_endpoint is None:
            # sidecars export spans to the embedded trace store
            tracing = msgspec.structs.replace(
                self.mesh.tracing, otlp_endpoint=self.url + "/telemetry/v1/traces"
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
        self.debouncer.fire()
        self.push_now()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._push_loop(), name="cp-push"),
            loop.create_task(self._health_loop(), name="cp-health"),
            loop.create_task(self.autoregister.run(), name="cp-autoregister"),
        ]
        if self.store.directory is not None:
            self._tasks.append(loop.create_task(self.store.watch(), name="cp-watch"))
        if self.metrics is not None:
            from diktyo.telemetry.scrape import Scraper

            self._scraper = Scraper(
                self.metrics,
                lambda: [(n, u + "/stats/prometheus") for n, u in self.admin_urls.items()],
                interval=self.scrape_interval,
            )
            self._scraper.start()
        log.info("control plane serving on %s", self.url)
        return self.url

    async def stop(self) -> None:
        self._closing = True
        await self.backend.stop()
        if self._scraper is not None:
            await self._scraper.close()
            self._scraper = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
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
        if self.traces is not None:
            self.traces.close()

    async def _push_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while True:
                deadline = self.debouncer.deadline()
                if deadline is None:
                    break
                now = self.clock.monotonic()
                if now >= deadline:
                    self.debouncer.fire()
                    try:
                        await self.push_async()
                    except Exception:
                        log.exception("push failed")
                    break
                try:
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel
                    # that arrives as the kick does, and stop() then waits for this task forever
                    async with asyncio.timeout(deadline - now):
                        await self._kick.wait()
                    self._kick.clear()
                except TimeoutError:
                    pass

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            targets = list(self.registry.admin_urls.items())
            if not targets or not self.backend.is_leader:  # one replica checks (etcd leader)
                continue
            results = await asyncio.gather(*(self._probe(url) for _, url in targets))
            for (name, _), ok in zip(targets, results, strict=True):
                inst = self.registry.instances.get(name)
                if inst is None:
                    self.health.forget(name)
                    continue
                new = self.health.observe(name, ok, inst.healthy)
                if new is not None:
                    log.warning("instance %s is now %s", name, "healthy" if new else "UNHEALTHY")
                    self.registry.set_healthy(name, new)

    async def _probe(self, admin_url: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(admin_url + "/ready") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # ------------------------------------------------------------------ HTTP API

    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=16 * 1024 * 1024, middlewares=[self.access.middleware()]
        )
        r = app.router
        r.add_get("/healthz", self._h_healthz)
        r.add_get("/v1/snapshot", self._h_snapshot)
        r.add_post("/v1/ack", self._h_ack)
        r.add_get("/v1/config", self._h_config)
        r.add_post("/v1/config", self._h_apply)
        r.add_delete("/v1/config", self._h_delete)
        r.add_delete("/v1/config/{kind}/{namespace}/{name}", self._h_delete_one)
        r.add_get("/v1/registry", self._h_registry)
        r.add_post("/v1/registry/services", self._h_add_service)
        r.add_delete("/v1/registry/services/{hostname}", self._h_del_service)
        r.add_post("/v1/registry/instances", self._h_add_instance)
        r.add_delete("/v1/registry/instances/{name}", self._h_del_instance)
        r.add_post("/v1/registry/proxies", self._h_add_proxy)
        r.add_delete("/v1/registry/proxies/{node}", self._h_del_proxy)
        r.add_get("/v1/proxies", self._h_proxies)
        r.add_get("/v1/replicas", self._h_replicas)
        r.add_get("/v1/proxies/{node}/snapshot", self._h_proxy_snapshot)
        r.add_get("/v1/workloads", self._h_workloads)
        r.add_post("/v1/tokens", self._h_token)
        app.add_routes(self.identity.routes())
        app.add_routes(self.autoregister.routes())
        if not (self._observability and self._setup_observability(app)):
            r.add_get("/", self._h_index)
        return app

    def _setup_observability(self, app: web.Application) -> bool:
        """Embedded metric/trace stores, the dashboard at ``/``, telemetry API under ``/telemetry``."""
        try:
            from diktyo.dashboard.backend import MeshBackend
            from diktyo.dashboard.server import setup_dashboard
            from diktyo.telemetry.http import setup_routes
            from diktyo.telemetry.store import MetricStore, TraceStore
        except ImportError as exc:  # a partial install: keep the placeholder page
            log.info("dashboard not available: %s", exc)
            return False
        self.metrics = MetricStore()
        self.traces = TraceStore()
        self.metric_source = self.metrics
        if self.prometheus_url:
            from diktyo.telemetry.prometheus_source import PrometheusSource

            self.metric_source = PrometheusSource(self.prometheus_url)
        backend = MeshBackend(
            self.metric_source, self.traces, config=self._dashboard_config,
            resilience=self.resilience,
            mtls=getattr(self.metric_source, "mtls_edge", None),  # edges seen over mTLS
        )  # fmt: skip
        setup_dashboard(app, backend)
        telemetry = web.Application(client_max_size=16 * 1024 * 1024)
        setup_routes(telemetry, self.metrics, self.traces)
        app.add_subapp("/telemetry", telemetry)
        return True

    async def resilience(self) -> list[dict[str, Any]]:
        """Breaker and outlier state of every used outbound cluster of every sidecar (admin /clusters)."""
        targets = [(n, u) for n, u in self.admin_urls.items() if n in self.proxies]

        async def fetch(url: str) -> Any:
            if self._session is None:
                return None
            try:
                async with self._session.get(url + "/clusters") as resp:
                    return await resp.json(content_type=None) if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return None

        answers = await asyncio.gather(*(fetch(u) for _, u in targets))
        cards: list[dict[str, Any]] = []
        for (node_id, _), body in zip(targets, answers, strict=True):
            if not isinstance(body, dict):
                continue
            workload = self.proxies[node_id].node.workload
            for c in body.get("clusters", []):
                if not str(c.get("name", "")).startswith("outbound|"):
                    continue
                cb = c.get("circuit_breaker") or {}
                limits, cur = cb.get("limits", {}), cb.get("current", {})
                hosts = c.get("hosts", [])
                counters = {k: v for k, v in (cb.get("counters") or {}).items() if v}
                used = (
                    c.get("active_requests")
                    or counters
                    or any(v for v in (c.get("counters") or {}).values())
                    or any(h.get("ejected") or h.get("active_requests") for h in hosts)
                )
                if not used:
                    continue
                cards.append(
                    {
                        "node": node_id,
                        "workload": workload,
                        "cluster": c["name"],
                        "breaker": {
                            "connections": cur.get("connections", 0),
                            "max_connections": limits.get("max_connections"),
                            "pending": cur.get("pending", 0),
                            "max_pending": limits.get("max_pending_requests"),
                            "requests": cur.get("requests", 0),
                            "max_requests": limits.get("max_requests"),
                            "retries": cur.get("retries", 0),
                            "max_retries": limits.get("max_retries"),
                        },
                        "overflows": counters,
                        "hosts": [
                            {
                                "address": f"{h.get('address')}:{h.get('port')}",
                                "ejected": bool(h.get("ejected")),
                                "active": h.get("active_requests", 0),
                            }
                            for h in hosts
                        ],
                    }
                )
        return cards

    def _dashboard_config(self) -> dict[str, Any]:
        resources = []
        for res in self.store.resources:
            kind, ns, name = resource_key(res)
            resources.append(
                {
                    "kind": kind,
                    "namespace": ns,
                    "name": name,
                    "file": getattr(res, "file", ""),
                    "line": getattr(res, "line", 0),
                }
            )
        messages = [
            m.to_json()
            if hasattr(m, "to_json")
            else {"file": "", "line": 0, "column": 0, "severity": "error", "message": str(m)}
            for m in self.analysis_raw
        ]
        for err in [
            *self.store.errors,
            *(e for es in self.store.source_errors.values() for e in es),
        ]:
            messages.append(
                {"file": "", "line": 0, "column": 0, "severity": "error", "message": err}
            )
        # which replica answers, all replicas and the leader (etcd store; one for embedded)
        return {
            "resources": resources,
            "messages": messages,
            "control_plane": self.backend.describe(),
        }

    async def _h_index(self, request: web.Request) -> web.Response:
        return web.Response(text=_PLACEHOLDER_PAGE, content_type="text/html")

    async def _h_healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ok": True,
                "proxies": len(self.proxies),
                "push": self.push_version,
                "replica": self.backend.replica_id,
                "leader": self.backend.is_leader,
            }
        )

    async def _h_snapshot(self, request: web.Request) -> web.StreamResponse:
        node_id = request.query.get("node", "")
        have = request.query.get("version", "")
        if node_id not in self.proxies:
            return _error(
                404,
                f"unknown node {node_id!r}: register it first (POST /v1/registry/proxies, "
                "or start it with 'diktyo up'); known nodes: " + ", ".join(sorted(self.proxies)),
            )
        proxy = self.proxies[node_id]
        if not self._may_act_for(request, proxy.node.namespace, proxy.node.service_account):
            return self._forbidden(request, f"node {node_id!r}")
        # a sidecar's token is renewed on every answer, so a long-running sidecar keeps polling
        renew = (
            {}
            if request.get(PRINCIPAL) in (ADMIN, UNVERIFIED)
            else {"x-diktyo-token": self.sidecar_token(proxy)}
        )
        st = self.status[node_id]
        st.last_seen = self.clock.time()
        st.polls += 1
        self.backend.note_connection(node_id)
        if self.backend.scoped and self.cache.get(node_id) is None:
            self.push_now(only_new=True)  # a sidecar new to this replica (etcd): translate it
        deadline = self.clock.monotonic() + self.poll_timeout
        while True:
            entry = self.cache.get(node_id)
            if entry is not None and st.sent != entry.version and _same_content(have, entry.digest):
                # the proxy already holds this content under another version (e.g. from before a
                # control plane restart): adopt it instead of pushing it again
                st.sent = entry.version
                if request.query.get("rejected") == "1":
                    st.ack(entry.version, False, f"rejected as {have}", self.clock.time())
                else:
                    st.ack(entry.version, True, "", self.clock.time())
                have = entry.version
                continue
            if entry is not None and entry.version != have:
                st.sent = entry.version
                return web.Response(
                    body=entry.data,
                    content_type="application/json",
                    headers={"x-diktyo-version": entry.version, **renew},
                )
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0 or node_id not in self.proxies or self._closing:
                return web.Response(status=204, headers=renew)
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.get(node_id)
            if waiters is None:
                waiters = self._waiters[node_id] = set()
            waiters.add(fut)
            st.connected = True
            # a timer handle instead of asyncio.wait(): no extra task/callback set per poll
            timer = loop.call_later(remaining, _wake, fut)
            try:
                await fut
            finally:
                timer.cancel()
                st.connected = False
                waiters.discard(fut)
            if node_id not in self.proxies or self._closing:
                return web.Response(status=204)

    async def _h_ack(self, request: web.Request) -> web.Response:
        try:
            body = decode_json(await request.read())
            node_id, version = str(body["node"]), str(body["version"])
            ok = bool(body.get("ok", True))
        except ParseLimitError as exc:
            return _limit_error(exc)
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(
                400, 'ack body must be JSON {"node": ID, "version": V, "ok": bool, "error": "..."}'
            )
        st = self.status.get(node_id)
        proxy = self.proxies.get(node_id)
        if st is None or proxy is None:
            return _error(404, f"unknown node {node_id!r}")
        if not self._may_act_for(request, proxy.node.namespace, proxy.node.service_account):
            return self._forbidden(request, f"node {node_id!r}")
        st.ack(version, ok, str(body.get("error") or ""), self.clock.time())
        if not ok:
            log.warning("%s rejected snapshot %s: %s", node_id, version, st.error)
        return web.Response(body=_ACK_OK, content_type="application/json")

    async def _h_config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "generation": self.store.generation,
                "directory": str(self.store.directory or ""),
                "resources": [list(k) for k in self.store.resource_keys()],
                "errors": list(self.store.errors),
                "warnings": list(self.store.warnings),
                "source_errors": {k: list(v) for k, v in self.store.source_errors.items()},
                "analysis": self.analysis,
                "push_version": self.push_version,
            }
        )

    async def _h_apply(self, request: web.Request) -> web.Response:
        """``POST /v1/config``: YAML (``?source=NAME``) or JSON ``{"files": [{source, text}]}``.

        All files are applied together or not at all: load errors, then analysis errors (in
        the applied files, or new ones elsewhere that the change causes) reject the whole
        request and the last good config keeps serving. Loading and analysis run in a worker
        thread, so a large apply does not stall the event loop (long polls, ``/healthz``).
        """
        files = await _apply_files(request)
        if isinstance(files, web.Response):
            return files
        keys: list[Any] = []
        async with self._apply_lock:
            for attempt in range(8):  # a compare-and-swap lost to another replica: re-validate
                view = self.store.view()
                registry = self.registry.view()
                resources, errors, messages = await asyncio.to_thread(
                    self._prepare_apply, files, view, registry
                )
                if errors:
                    break
                try:
                    keys = await self.backend.commit(resources, files)
                    break
                except StoreConflict:
                    log.info("apply conflicted with another replica's write; retrying")
                    await asyncio.sleep(0.01 * attempt)
                    await self.backend.catch_up()
                except StoreUnavailable as exc:
                    log.warning("apply of %s failed: %s", ", ".join(f for f, _ in files), exc)
                    return _error(503, f"config not stored: {exc}")
            else:
                return _error(
                    409,
                    "config not stored: other replicas kept changing the same "
                    "resources (8 attempts); apply again",
                )
            if errors:
                log.warning(
                    "apply of %s rejected (%d errors); keeping the last good config",
                    ", ".join(f for f, _ in files),
                    len(errors),
                )
                return web.json_response(
                    {
                        "applied": [],
                        "errors": list(errors),
                        "messages": list(messages),
                        "message": "config rejected; the control plane keeps serving the last "
                        "good config",
                    },
                    status=400,
                )
        return web.json_response(
            {"applied": [list(k) for k in keys], "errors": [], "messages": list(messages)}
        )

    def _prepare_apply(
        self, files: list[tuple[str, str]], view: StoreView, registry: Registry
    ) -> tuple[tuple[Any, ...], tuple[str, ...], tuple[str, ...]]:
        """(resources, errors, other findings) of an apply; runs in a worker thread."""
        prepared = self.store.prepare(files)
        if prepared.errors:
            return (), prepared.errors, prepared.warnings
        try:
            from diktyo.control.validate import analyze
        except ImportError:
            return prepared.resources, (), prepared.warnings
        sources = {source for source, _ in files}
        try:
            before = {str(m) for m in analyze(view.resources(), registry) if _is_error(m)}
            after = analyze(view.resources(prepared.resources), registry)
        except Exception as exc:  # a validator bug must not block every apply
            log.warning("analysis of an apply failed", exc_info=True)
            return prepared.resources, (), (f"analyze failed: {type(exc).__name__}: {exc}",)
        errors = tuple(
            str(m)
            for m in after
            if _is_error(m) and (getattr(m, "file", None) in sources or str(m) not in before)
        )
        messages = prepared.warnings + tuple(
            str(m) for m in after if not _is_error(m) and getattr(m, "file", None) in sources
        )
        return prepared.resources, errors, messages

    async def _h_delete(self, request: web.Request) -> web.Response:
        text = await request.text()
        named, errors = self.store.names_in(text, request.query.get("source", "<api>"))
        keys: list[Any] = []
        if named:
            deleted = await self._delete_keys(named)
            if isinstance(deleted, web.Response):
                return deleted
            keys, errors = deleted
        status = 200 if keys or not errors else 404
        return web.json_response(
            {"deleted": [list(k) for k in keys], "errors": list(errors)}, status=status
        )

    async def _h_delete_one(self, request: web.Request) -> web.Response:
        m = request.match_info
        deleted = await self._delete_keys([(m["kind"], m["namespace"], m["name"])])
        if isinstance(deleted, web.Response):
            return deleted
        keys, errors = deleted
        return web.json_response(
            {"deleted": [list(k) for k in keys], "errors": list(errors)},
            status=200 if keys else 404,
        )

    async def _delete_keys(
        self, keys: list[Any]
    ) -> tuple[list[Any], tuple[str, ...]] | web.Response:
        async with self._apply_lock:
            for _ in range(8):
                try:
                    return await self.backend.delete(keys)
                except StoreConflict:
                    await self.backend.catch_up()
                except StoreUnavailable as exc:
                    return _error(503, f"config not deleted: {exc}")
        return _error(409, "config not deleted: other replicas kept changing it; try again")

    async def _h_replicas(self, request: web.Request) -> web.Response:
        return web.json_response(self.backend.describe())

    async def _h_registry(self, request: web.Request) -> web.Response:
        reg = self.registry
        return web.json_response(
            {
                "services": msgspec.to_builtins(list(reg.services.values())),
                "instances": msgspec.to_builtins(list(reg.instances.values())),
                "proxies": msgspec.to_builtins(list(self.proxies.values())),
            },
            dumps=_dumps,
        )

    async def _h_add_service(self, request: web.Request) -> web.Response:
        svc = await _decode(request, Service)
        if isinstance(svc, web.Response):
            return svc
        self.registry.add_service(svc)
        return web.json_response({"ok": True})

    async def _h_del_service(self, request: web.Request) -> web.Response:
        ok = self.registry.remove_service(request.match_info["hostname"])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    async def _h_add_instance(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            check_json(raw)
            admin_url = json.loads(raw).pop("admin_url", None)
            data = json.loads(raw)
            data.pop("admin_url", None)
            inst = msgspec.convert(data, WorkloadInstance, strict=False)
        except ParseLimitError as exc:
            return _limit_error(exc)
        except (ValueError, msgspec.ValidationError, AttributeError) as exc:
            return _error(400, f"bad instance: {exc}")
        if not self._may_act_for(request, inst.namespace, inst.service_account):
            return self._forbidden(request, f"instance {inst.name!r}")
        self.registry.add_instance(inst, admin_url)
        return web.json_response({"ok": True})

    async def _h_del_instance(self, request: web.Request) -> web.Response:
        ok = self.registry.remove_instance(request.match_info["name"])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    async def _h_add_proxy(self, request: web.Request) -> web.Response:
        proxy = await _decode(request, ProxyNode)
        if isinstance(proxy, web.Response):
            return proxy
        if not self._may_act_for(request, proxy.node.namespace, proxy.node.service_account):
            return self._forbidden(request, f"node {proxy.node.id!r}")
        known = self.proxies.get(proxy.node.id)
        if known is not None and not self._may_act_for(
            request, known.node.namespace, known.node.service_account
        ):
            return self._forbidden(request, f"node {proxy.node.id!r}")
        self.add_proxy(proxy)
        return web.json_response({"ok": True, "node": proxy.node.id})

    async def _h_del_proxy(self, request: web.Request) -> web.Response:
        ok = self.remove_proxy(request.match_info["node"])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    async def _h_proxies(self, request: web.Request) -> web.Response:
        out = []
        for node_id in sorted(self.proxies):
            d = self.status[node_id].to_json()
            proxy = self.proxies[node_id]
            d["workload"] = proxy.node.workload
            d["namespace"] = proxy.node.namespace
            d["mode"] = proxy.node.mode
            d["translate_error"] = self.cache.errors.get(node_id, "")
            d["replica"] = self.backend.connection_of(node_id)
            out.append(d)
        return web.json_response({"push_version": self.push_version, "proxies": out})

    async def _h_proxy_snapshot(self, request: web.Request) -> web.Response:
        node_id = request.match_info["node"]
        entry = self.cache.get(node_id)
        if entry is None:
            known = ", ".join(sorted(self.proxies)) or "none"
            return _error(404, f"no snapshot for node {node_id!r} (known nodes: {known})")
        return web.Response(body=entry.data, content_type="application/json")

    async def _h_token(self, request: web.Request) -> web.Response:
        """Admin: a bootstrap token for ``{"namespace", "service_account", "ttl"?}`` (a sidecar
        started by hand passes it with ``--token-file``)."""
        try:
            body = decode_json(await request.read())
            ns = str(body.get("namespace") or "default")
            sa = str(body.get("service_account") or "default")
            ttl = float(body.get("ttl") or 3600.0)
            token = self.identity.token_for(ns, sa, ttl)
        except ParseLimitError as exc:
            return _limit_error(exc)
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, f'body must be {{"namespace": NS, "service_account": SA}}: {exc}')
        return web.json_response({"token": token, "spiffe_id": self.identity.spiffe_id(ns, sa)})

    async def _h_workloads(self, request: web.Request) -> web.Response:
        items = self.workloads_provider() if self.workloads_provider else []
        return web.json_response({"workloads": items})


class _LazyTranslator:
    """Import the real translator on first use, so the server starts without it in tests."""

    def __init__(self) -> None:
        self._fn: Any = None

    def __call__(self, proxy: ProxyNode, push: PushContext) -> Any:
        return self.build(proxy, push).snapshot

    def build(self, proxy: ProxyNode, push: PushContext) -> Any:
        """Snapshot and its pre-encoded wire twin (``PushTranslator.build``)."""
        if self._fn is None:
            self._fn = _default_translator()
        return self._fn.build(proxy, push)


_ACK_OK = b'{"ok": true}'


def _wake(fut: asyncio.Future[None]) -> None:
    """Long-poll timeout: wake the waiting handler (it answers 204)."""
    if not fut.done():
        fut.set_result(None)


def _same_content(version: str, digest: str) -> bool:
    """Whether ``version`` (``<push>-<hash8>``) names a snapshot with this content digest."""
    return "-" in version and version.rsplit("-", 1)[1] == digest[:8]


def _is_error(finding: Any) -> bool:
    """An analyzer finding that rejects an apply (see ``validate.messages.rejects_apply``)."""
    from diktyo.control.validate.messages import rejects_apply

    return rejects_apply(finding)


async def _apply_files(request: web.Request) -> list[tuple[str, str]] | web.Response:
    """``[(source, text)]`` of an apply request, or the 400 answer."""
    source = request.query.get("source", "<api>")
    if request.content_type != "application/json":
        return [(source, await request.text())]
    raw = await request.read()
    try:
        body = decode_json(raw)
        files = [(str(f.get("source") or source), str(f["text"])) for f in body["files"]]
    except ParseLimitError as exc:
        return _limit_error(exc)
    except (ValueError, KeyError, TypeError, AttributeError):
        return _error(
            400,
            'a JSON apply body is {"files": [{"source": NAME, "text": YAML}, ...]}; '
            "or send the YAML itself with content-type application/yaml",
        )
    return files


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _limit_error(exc: ParseLimitError) -> web.Response:
    """400 for a body that breaks a parsing limit: position, limit, hint."""
    return web.json_response(
        {
            "error": f"<request body>:{exc.line}:{exc.col}: {exc.message}",
            "limit": exc.limit,
            "hint": exc.hint,
        },
        status=400,
    )


async def _decode(request: web.Request, typ: type) -> Any:
    raw = await request.read()
    try:
        return decode_json(raw, typ)
    except ParseLimitError as exc:
        return _limit_error(exc)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _error(400, f"bad {typ.__name__}: {exc}")


__all__ = ["ControlPlane", "resource_key", "to_builtins"]

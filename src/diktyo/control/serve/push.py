"""The push server: debounced push loop, snapshot cache, long-poll ``GET /v1/snapshot`` and ``POST /v1/ack``.

Every change calls ``kick()``. The push loop debounces (``serve.debounce``), builds one
immutable ``PushContext``, translates every served proxy and encodes each changed snapshot
once (``serve.cache``), then wakes the long polls of the proxies whose version changed.
Sidecars poll ``GET /v1/snapshot`` and answer ``POST /v1/ack``; ``serve.status`` keeps the
ACK/NACK bookkeeping behind ``diktyo proxy-status`` (``GET /v1/proxies``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from diktyo.api.limits import ParseLimitError, decode_json
from diktyo.control.auth import ADMIN, PRINCIPAL, UNVERIFIED
from diktyo.control.model import ProxyNode, PushContext, Registry
from diktyo.control.serve.analysis import Analysis
from diktyo.control.serve.cache import SnapshotCache, Translator
from diktyo.control.serve.debounce import Debouncer
from diktyo.control.serve.http import error, limit_error
from diktyo.control.serve.status import ProxyStatus

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane

log = logging.getLogger(__name__)

_ACK_OK = b'{"ok": true}'


class PushServer:
    """Push state and routes of one ``ControlPlane`` (``cp``: proxies, store, registry, backend)."""

    def __init__(
        self, cp: ControlPlane, translator: Translator, debounce: float, debounce_max: float
    ) -> None:
        self.cp = cp
        self.cache = SnapshotCache(translator)
        self.debouncer = Debouncer(debounce, debounce_max)
        self.status: dict[str, ProxyStatus] = {}
        self.analysis = Analysis()
        self.findings: list[str] = []  # the newest push's analysis, as text
        self.findings_raw: list[Any] = []
        self.push_version = 0
        self.pushes = 0
        self.last_push: PushContext | None = None
        self.closing = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._kick = asyncio.Event()

    # ------------------------------------------------------------------ state

    def kick(self) -> None:
        """Something changed: schedule a (debounced) push."""
        self.debouncer.change(self.cp.clock.monotonic())
        self._kick.set()

    def forget(self, node_id: str) -> None:
        """A proxy left: drop its state and end its long polls."""
        self.status.pop(node_id, None)
        self.cache.drop(node_id)
        for fut in self._waiters.pop(node_id, set()):
            if not fut.done():
                fut.set_result(None)

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
        serves = self.cp.backend.serves
        out = []
        for node_id, proxy in self.cp.proxies.items():
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
            batch = [p for p in proxies[i : i + chunk] if p.node.id in self.cp.proxies]
            built = await asyncio.to_thread(self.cache.compute, push, batch)
            if self.push_version != version:
                break  # superseded while translating: do not install older snapshots
            built = [b for b in built if b.node_id in self.cp.proxies]
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
        cp = self.cp
        resources = cp.store.resources
        registry = cp.registry.view()
        if cp.merge_service_entries:
            try:
                registry = _merge_service_entries(resources, registry)
            except Exception:
                log.warning("ServiceEntry registry merge failed", exc_info=True)
        return PushContext(resources, registry, cp.mesh, str(self.push_version))

    def _analyze(self, push: PushContext) -> None:
        try:
            self.findings_raw = self.analysis.findings(push.resources, push.registry)
            self.findings = [str(m) for m in self.findings_raw]
        except Exception as exc:  # noqa: BLE001 - a validator bug must not stop pushes
            self.findings = [f"analyze failed: {type(exc).__name__}: {exc}"]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """The first push, then the push loop (the caller owns the task)."""
        self._kick = asyncio.Event()
        self.closing = False
        self.debouncer.fire()
        self.push_now()
        return asyncio.get_running_loop().create_task(self._push_loop(), name="cp-push")

    def close(self) -> None:
        """End every long poll (they answer 204): the control plane is stopping."""
        self.closing = True
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    async def _push_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while True:
                deadline = self.debouncer.deadline()
                if deadline is None:
                    break
                now = self.cp.clock.monotonic()
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

    # ------------------------------------------------------------------ HTTP

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/snapshot", self._h_snapshot),
            web.post("/v1/ack", self._h_ack),
            web.get("/v1/proxies", self._h_proxies),
            web.get("/v1/proxies/{node}/snapshot", self._h_proxy_snapshot),
        ]

    async def _h_snapshot(self, request: web.Request) -> web.StreamResponse:
        cp = self.cp
        node_id = request.query.get("node", "")
        have = request.query.get("version", "")
        if node_id not in cp.proxies:
            return error(
                404,
                f"unknown node {node_id!r}: register it first (POST /v1/registry/proxies, "
                "or start it with 'diktyo up'); known nodes: " + ", ".join(sorted(cp.proxies)),
            )
        proxy = cp.proxies[node_id]
        if not cp.may_act_for(request, proxy.node.namespace, proxy.node.service_account):
            return cp.forbidden(request, f"node {node_id!r}")
        # a sidecar's token is renewed on every answer, so a long-running sidecar keeps polling
        renew = (
            {}
            if request.get(PRINCIPAL) in (ADMIN, UNVERIFIED)
            else {"x-diktyo-token": cp.sidecar_token(proxy)}
        )
        st = self.status[node_id]
        st.last_seen = cp.clock.time()
        st.polls += 1
        cp.backend.note_connection(node_id)
        if cp.backend.scoped and self.cache.get(node_id) is None:
            self.push_now(only_new=True)  # a sidecar new to this replica (etcd): translate it
        deadline = cp.clock.monotonic() + cp.poll_timeout
        while True:
            entry = self.cache.get(node_id)
            if entry is not None and st.sent != entry.version and _same_content(have, entry.digest):
                # the proxy already holds this content under another version (e.g. from before a
                # control plane restart): adopt it instead of pushing it again
                st.sent = entry.version
                if request.query.get("rejected") == "1":
                    st.ack(entry.version, False, f"rejected as {have}", cp.clock.time())
                else:
                    st.ack(entry.version, True, "", cp.clock.time())
                have = entry.version
                continue
            if entry is not None and entry.version != have:
                st.sent = entry.version
                return web.Response(
                    body=entry.data,
                    content_type="application/json",
                    headers={"x-diktyo-version": entry.version, **renew},
                )
            remaining = deadline - cp.clock.monotonic()
            if remaining <= 0 or node_id not in cp.proxies or self.closing:
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
            if node_id not in cp.proxies or self.closing:
                return web.Response(status=204)

    async def _h_ack(self, request: web.Request) -> web.Response:
        cp = self.cp
        try:
            body = decode_json(await request.read())
            node_id, version = str(body["node"]), str(body["version"])
            ok = bool(body.get("ok", True))
        except ParseLimitError as exc:
            return limit_error(exc)
        except (ValueError, KeyError, TypeError, AttributeError):
            return error(
                400, 'ack body must be JSON {"node": ID, "version": V, "ok": bool, "error": "..."}'
            )
        st = self.status.get(node_id)
        proxy = cp.proxies.get(node_id)
        if st is None or proxy is None:
            return error(404, f"unknown node {node_id!r}")
        if not cp.may_act_for(request, proxy.node.namespace, proxy.node.service_account):
            return cp.forbidden(request, f"node {node_id!r}")
        st.ack(version, ok, str(body.get("error") or ""), cp.clock.time())
        if not ok:
            log.warning("%s rejected snapshot %s: %s", node_id, version, st.error)
        return web.Response(body=_ACK_OK, content_type="application/json")

    async def _h_proxies(self, request: web.Request) -> web.Response:
        out = []
        for node_id in sorted(self.cp.proxies):
            d = self.status[node_id].to_json()
            proxy = self.cp.proxies[node_id]
            d["workload"] = proxy.node.workload
            d["namespace"] = proxy.node.namespace
            d["mode"] = proxy.node.mode
            d["translate_error"] = self.cache.errors.get(node_id, "")
            d["replica"] = self.cp.backend.connection_of(node_id)
            out.append(d)
        return web.json_response({"push_version": self.push_version, "proxies": out})

    async def _h_proxy_snapshot(self, request: web.Request) -> web.Response:
        node_id = request.match_info["node"]
        entry = self.cache.get(node_id)
        if entry is None:
            known = ", ".join(sorted(self.cp.proxies)) or "none"
            return error(404, f"no snapshot for node {node_id!r} (known nodes: {known})")
        return web.Response(body=entry.data, content_type="application/json")


def _merge_service_entries(resources: tuple[Any, ...], registry: Registry) -> Registry:
    """Add services/instances declared by ServiceEntry resources."""
    from diktyo.control.translate import registry_from_service_entries

    extra = registry_from_service_entries(resources)
    return Registry(
        services=registry.services + tuple(extra.services),
        instances=registry.instances + tuple(extra.instances),
    )


def _wake(fut: asyncio.Future[None]) -> None:
    """Long-poll timeout: wake the waiting handler (it answers 204)."""
    if not fut.done():
        fut.set_result(None)


def _same_content(version: str, digest: str) -> bool:
    """Whether ``version`` (``<push>-<hash8>``) names a snapshot with this content digest."""
    return "-" in version and version.rsplit("-", 1)[1] == digest[:8]

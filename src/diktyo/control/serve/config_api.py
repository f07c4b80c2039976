"""The config API: ``GET/POST/DELETE /v1/config`` (``diktyo apply``/``delete``) and ``/v1/replicas``.

An apply is all or nothing: load errors, then analysis errors (in the applied files, or new
ones elsewhere that the change causes) reject the whole request, and the last good config
keeps serving. Loading and analysis run in a worker thread; the store backend (in memory or
etcd, ``control.backend``) stores what passed, retrying a compare-and-swap lost to another
replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from diktyo.api.limits import ParseLimitError, decode_json
from diktyo.control.backend import StoreConflict, StoreUnavailable
from diktyo.control.model import Registry
from diktyo.control.serve.http import error, limit_error
from diktyo.control.store import StoreView

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane

log = logging.getLogger(__name__)


class ConfigApi:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._apply_lock = asyncio.Lock()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/config", self._h_config),
            web.post("/v1/config", self._h_apply),
            web.delete("/v1/config", self._h_delete),
            web.delete("/v1/config/{kind}/{namespace}/{name}", self._h_delete_one),
            web.get("/v1/replicas", self._h_replicas),
        ]

    async def _h_config(self, request: web.Request) -> web.Response:
        store = self.cp.store
        return web.json_response(
            {
                "generation": store.generation,
                "directory": str(store.directory or ""),
                "resources": [list(k) for k in store.resource_keys()],
                "errors": list(store.errors),
                "warnings": list(store.warnings),
                "source_errors": {k: list(v) for k, v in store.source_errors.items()},
                "analysis": self.cp.push.findings,
                "push_version": self.cp.push.push_version,
            }
        )

    async def _h_apply(self, request: web.Request) -> web.Response:
        """``POST /v1/config``: YAML (``?source=NAME``) or JSON ``{"files": [{source, text}]}``."""
        wait = _wait_seconds(request)
        if isinstance(wait, web.Response):
            return wait
        files = await _apply_files(request)
        if isinstance(files, web.Response):
            return files
        cp = self.cp
        keys: list[Any] = []
        async with self._apply_lock:
            for attempt in range(8):  # a compare-and-swap lost to another replica: re-validate
                view = cp.store.view()
                registry = cp.registry.view()
                resources, errors, messages = await asyncio.to_thread(
                    self._prepare_apply, files, view, registry
                )
                if errors:
                    break
                try:
                    keys = await cp.backend.commit(resources, files)
                    break
                except StoreConflict:
                    log.info("apply conflicted with another replica's write; retrying")
                    await asyncio.sleep(0.01 * attempt)
                    await cp.backend.catch_up()
                except StoreUnavailable as exc:
                    log.warning("apply of %s failed: %s", ", ".join(f for f, _ in files), exc)
                    return error(503, f"config not stored: {exc}")
            else:
                return error(
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
        body: dict[str, Any] = {
            "applied": [list(k) for k in keys],
            "errors": [],
            "messages": list(messages),
        }
        if wait is not None:
            body["distribution"] = await self._distribute(wait)
        return web.json_response(body)

    async def _distribute(self, timeout: float) -> dict[str, Any]:
        """Wait until every sidecar this control plane serves ACKed (or NACKed) a snapshot built
        after the change, like ``istioctl experimental wait --for=distribution``: pushed now,
        not after the debounce. ``synced``/``late`` name the sidecars."""
        cp = self.cp
        await cp.backend.catch_up()  # etcd: the local store holds the write before the push
        await cp.sync(timeout)
        synced, late = [], []
        for node, st in sorted(cp.status.items()):
            if st.state == "SYNCED":
                synced.append(node)
            else:
                late.append({"node": node, "state": st.state, "error": st.error})
        return {"version": str(cp.push.push_version), "synced": synced, "late": late}

    def _prepare_apply(
        self, files: list[tuple[str, str]], view: StoreView, registry: Registry
    ) -> tuple[tuple[Any, ...], tuple[str, ...], tuple[str, ...]]:
        """(resources, errors, other findings) of an apply; runs in a worker thread. The
        analysis is the push's (``serve.analysis``): the "before" side is what the last push
        found, and the push after this apply reuses the "after" side."""
        prepared = self.cp.store.prepare(files)
        if prepared.errors:
            return (), prepared.errors, prepared.warnings
        analysis = self.cp.push.analysis
        sources = {source for source, _ in files}
        try:
            before = {str(m) for m in analysis.findings(view.resources(), registry) if _is_error(m)}
            after = analysis.findings(view.resources(prepared.resources), registry)
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
        wait = _wait_seconds(request)
        if isinstance(wait, web.Response):
            return wait
        text = await request.text()
        named, errors = self.cp.store.names_in(text, request.query.get("source", "<api>"))
        keys: list[Any] = []
        if named:
            deleted = await self._delete_keys(named)
            if isinstance(deleted, web.Response):
                return deleted
            keys, errors = deleted
        status = 200 if keys or not errors else 404
        body: dict[str, Any] = {"deleted": [list(k) for k in keys], "errors": list(errors)}
        if wait is not None and keys:
            body["distribution"] = await self._distribute(wait)
        return web.json_response(body, status=status)

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
                    return await self.cp.backend.delete(keys)
                except StoreConflict:
                    await self.cp.backend.catch_up()
                except StoreUnavailable as exc:
                    return error(503, f"config not deleted: {exc}")
        return error(409, "config not deleted: other replicas kept changing it; try again")

    async def _h_replicas(self, request: web.Request) -> web.Response:
        return web.json_response(self.cp.backend.describe())


MAX_WAIT = 300.0


def _wait_seconds(request: web.Request) -> float | None | web.Response:
    """``?wait=SECONDS``: answer once the change reached every sidecar (at most ``MAX_WAIT``)."""
    raw = request.query.get("wait")
    if raw is None:
        return None
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:  # also rejects nan
        return error(400, f"wait={raw!r}: give seconds from 0 to {MAX_WAIT:g}")
    return wait


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
        return limit_error(exc)
    except (ValueError, KeyError, TypeError, AttributeError):
        return error(
            400,
            'a JSON apply body is {"files": [{"source": NAME, "text": YAML}, ...]}; '
            "or send the YAML itself with content-type application/yaml",
        )
    return files

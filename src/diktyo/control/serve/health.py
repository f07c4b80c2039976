"""Health checking of registered instances through their sidecar's admin ``/ready``.

Sans-I/O ``HealthTracker`` counts consecutive results per instance (unhealthy after
``unhealthy_threshold`` failures, healthy again after ``healthy_threshold`` successes, like
Kubernetes probes); ``HealthChecker`` probes every instance that gave an admin URL each
``cp.health_interval`` seconds (on one replica: the etcd leader) and serves the control
plane's own ``GET /healthz``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from diktyo.control.server import ControlPlane

log = logging.getLogger(__name__)


class HealthTracker:
    def __init__(self, unhealthy_threshold: int = 2, healthy_threshold: int = 1) -> None:
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self._fails: dict[str, int] = {}
        self._oks: dict[str, int] = {}

    def observe(self, name: str, ok: bool, healthy_now: bool) -> bool | None:
        """Record one probe; return the new health if it should change, else None."""
        if ok:
            self._fails[name] = 0
            self._oks[name] = self._oks.get(name, 0) + 1
            if not healthy_now and self._oks[name] >= self.healthy_threshold:
                return True
        else:
            self._oks[name] = 0
            self._fails[name] = self._fails.get(name, 0) + 1
            if healthy_now and self._fails[name] >= self.unhealthy_threshold:
                return False
        return None

    def forget(self, name: str) -> None:
        self._fails.pop(name, None)
        self._oks.pop(name, None)


class HealthChecker:
    """The probe loop over ``cp.registry.admin_urls`` and ``GET /healthz``."""

    def __init__(self, cp: ControlPlane, tracker: HealthTracker) -> None:
        self.cp = cp
        self.tracker = tracker
        self._session: aiohttp.ClientSession | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/healthz", self._h_healthz)]

    async def run(self, session: aiohttp.ClientSession) -> None:
        cp = self.cp
        self._session = session
        while True:
            await asyncio.sleep(cp.health_interval)
            targets = list(cp.registry.admin_urls.items())
            if not targets or not cp.backend.is_leader:  # one replica checks (etcd leader)
                continue
            results = await asyncio.gather(*(self.probe(url) for _, url in targets))
            for (name, _), ok in zip(targets, results, strict=True):
                inst = cp.registry.instances.get(name)
                if inst is None:
                    self.tracker.forget(name)
                    continue
                new = self.tracker.observe(name, ok, inst.healthy)
                if new is not None:
                    log.warning("instance %s is now %s", name, "healthy" if new else "UNHEALTHY")
                    cp.registry.set_healthy(name, new)

    async def probe(self, admin_url: str) -> bool:
        """One probe: the sidecar's admin ``/ready`` answers 200."""
        if self._session is None:
            return False
        try:
            async with self._session.get(admin_url + "/ready") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _h_healthz(self, request: web.Request) -> web.Response:
        cp = self.cp
        return web.json_response(
            {
                "ok": True,
                "proxies": len(cp.proxies),
                "push": cp.push.push_version,
                "replica": cp.backend.replica_id,
                "leader": cp.backend.is_leader,
            }
        )


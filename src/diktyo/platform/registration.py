"""The registrant's side of auto-registration: one WebSocket session per workload, kept up.

``WorkloadRegistration.run()`` connects to ``/v1/registry/workloadentries`` of the first
control plane that answers (it tries each of ``urls`` in turn), says hello with its group,
waits for ``register()`` to be given the workload's address and ports, registers, and then
forwards health changes (``set_health``). When the connection ends it reconnects (jittered
back-off, next address) and registers again, with its last health state: an entry whose
registrant reconnects within the control plane's grace period is kept. Protocol:
``diktyo.control.autoregister``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

PATH = "/v1/registry/workloadentries"


class RegistrationRefused(Exception):
    """The control plane refused the registration (the message says why)."""


class WorkloadRegistration:
    def __init__(
        self,
        urls: list[str],
        token: str,
        namespace: str,
        group: str,
        *,
        heartbeat: float = 5.0,
        backoff_cap: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("no control plane address")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.namespace = namespace
        self.group = group
        self.heartbeat = heartbeat
        self.backoff_cap = backoff_cap
        self.group_info: dict[str, Any] | None = None
        self.group_known = asyncio.Event()
        self.registered = asyncio.Event()
        self.name = ""
        self.connected_to = ""
        self.last_error = ""
        self.connects = 0
        self._payload: dict[str, Any] | None = None
        self._payload_set = asyncio.Event()
        self._health: tuple[bool, str] | None = None
        self._health_changed = asyncio.Event()
        self._rng = random.Random()
        # called after each (re)registration with the control plane's URL, and with each fresh
        # token the control plane sends (the agent re-registers its sidecar, keeps the token)
        self.on_registered: Callable[[str], Awaitable[None]] | None = None
        self.on_token: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ the workload's side

    def register(self, payload: dict[str, Any]) -> None:
        """Register with ``{"address", "node", "inbound", "labels", "network", "locality"}``."""
        self._payload = payload
        self._payload_set.set()

    def set_health(self, healthy: bool, message: str = "") -> None:
        if self._health == (healthy, message):
            return
        self._health = (healthy, message)
        self._health_changed.set()

    async def wait_group(self, timeout: float) -> dict[str, Any]:
        """The WorkloadGroup's template, labels and probe, once a control plane has answered."""
        try:
            await asyncio.wait_for(self.group_known.wait(), timeout)
        except TimeoutError:
            raise RegistrationRefused(
                f"no control plane at {', '.join(self.urls)} answered for WorkloadGroup "
                f"{self.namespace}/{self.group} within {timeout:g}s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            ) from None
        assert self.group_info is not None
        return self.group_info

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        attempt = 0
        index = 0
        async with aiohttp.ClientSession() as session:
            while True:
                url = self.urls[index % len(self.urls)]
                try:
                    await self._session(session, url)
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except aiohttp.WSServerHandshakeError as exc:
                    self.last_error = f"{url}: {exc.status} " + (
                        "the control plane refused the bootstrap token: it was not issued by "
                        "this control plane, or it expired; get a new one (POST /v1/tokens)"
                        if exc.status in (401, 403)
                        else f"registration endpoint answered {exc.message}"
                    )
                    log.warning("registration into %s/%s: %s", self.namespace, self.group,
                                self.last_error)  # fmt: skip
                except RegistrationRefused as exc:
                    self.last_error = str(exc)
                    log.warning("registration into %s/%s refused by %s: %s",
                                self.namespace, self.group, url, exc)  # fmt: skip
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError, TypeError) as exc:
                    self.last_error = f"{url}: {type(exc).__name__}: {exc}"
                    log.info("control plane %s unreachable for registration: %s", url, exc)
                self.registered.clear()
                self.connected_to = ""
                index += 1
                attempt += 1
                ceiling = min(self.backoff_cap, 0.1 * 2**attempt)
                await asyncio.sleep(0.05 + self._rng.random() * ceiling)

    async def _session(self, session: aiohttp.ClientSession, url: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with session.ws_connect(
            url + PATH,
            headers=headers,
            heartbeat=self.heartbeat,
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
        ) as ws:
            self.connects += 1
            await ws.send_json({"type": "hello", "group": self.group, "namespace": self.namespace})
            reply = await self._receive(ws)
            self.group_info = reply
            self.group_known.set()
            await self._payload_set.wait()
            assert self._payload is not None
            await ws.send_json({"type": "register", **self._payload})
            reply = await self._receive(ws)
            self.name = str(reply.get("name") or "")
            self.connected_to = url
            self.last_error = ""
            self.registered.set()
            log.info("registered WorkloadEntry %s/%s at %s", self.namespace, self.name, url)
            if self._health is not None:
                self._health_changed.set()  # the control plane gets the current state again
            if self.on_registered is not None and self.connects > 1:
                await self.on_registered(url)
            closed = asyncio.ensure_future(self._until_closed(ws))
            try:
                while not closed.done():
                    changed = asyncio.ensure_future(self._health_changed.wait())
                    await asyncio.wait({closed, changed}, return_when=asyncio.FIRST_COMPLETED)
                    if changed.done() and self._health is not None and not ws.closed:
                        self._health_changed.clear()
                        healthy, message = self._health
                        await ws.send_json(
                            {"type": "health", "healthy": healthy, "message": message}
                        )
                    else:
                        changed.cancel()
            finally:
                closed.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await closed
            raise aiohttp.ClientConnectionError(f"registration connection closed ({ws.close_code})")

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise aiohttp.ClientConnectionError(f"registration connection closed ({msg.type})")
        body = msg.json()
        if not isinstance(body, dict):
            raise TypeError("the control plane sent a message that is not a JSON object")
        if body.get("type") == "error":
            raise RegistrationRefused(str(body.get("error")))
        return body

    async def _until_closed(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                with contextlib.suppress(ValueError):
                    body = msg.json()
                    if not isinstance(body, dict):
                        continue
                    if body.get("type") == "error":
                        self.last_error = str(body.get("error"))
                        log.warning("control plane: %s", self.last_error)
                    elif body.get("type") == "token" and body.get("token"):
                        self.token = str(body["token"])
                        if self.on_token is not None:
                            self.on_token(self.token)

"""The sidecar's config client: long-polls the control plane for snapshots, ACKs or NACKs them.

Theory of operation
-------------------
``run()`` loops: ``GET /v1/snapshot?node=ID&version=LAST`` (the control plane holds the request
until it has a different version, or answers 204 after ~25 s). A 200 body is decoded
(``diktyo.snapshot.codec.decode``) and handed to ``on_snapshot``; if that (or decoding) raises,
the version is NACKed with the exception's message and the last good snapshot keeps serving;
otherwise it is ACKed and becomes the last good one. When the control plane is away (refused
connection, 5xx, 404 unknown node) the client retries with jittered exponential backoff
(0.1 s .. 5 s, "full jitter") and keeps serving.

Replicas: ``url`` may list several control planes (``URL,URL,...``, replicas sharing one
etcd store). The client talks to one at a time; when it goes away the client moves to the
next one at once (backoff only after every replica failed in a row) and resyncs by version:
it sends the version it holds, and a replica with the same content answers nothing new.
The sidecar keeps serving its snapshot throughout, so a replica's death fails no request.
Protocol: ``docs/mesh-file.md`` ("Control plane API").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable

import aiohttp

from diktyo.core.clock import make_random
from diktyo.snapshot.codec import decode
from diktyo.snapshot.model import Snapshot

log = logging.getLogger(__name__)

OnSnapshot = Callable[[Snapshot], "None | Awaitable[None]"]


class Backoff:
    """Full-jitter exponential backoff (sans-I/O): ``next()`` -> seconds to wait."""

    def __init__(
        self, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng or make_random()
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return float(self.base / 2 + self.rng.random() * max(0.0, ceiling - self.base / 2))

    def reset(self) -> None:
        self.attempt = 0


class ConfigClient:
    """Keeps a sidecar's snapshot in sync with the control plane at ``url`` for ``node_id``.

    ``url``: one base URL, or several (a list, or ``URL,URL,...``) of replicas to fail over between.
    """

    def __init__(
        self,
        url: str | list[str],
        node_id: str,
        on_snapshot: OnSnapshot,
        *,
        rng: random.Random | None = None,
        poll_timeout: float = 35.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        token: str | None = None,
    ) -> None:
        urls = url.split(",") if isinstance(url, str) else list(url)
        self.urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.urls:
            raise ValueError("ConfigClient needs at least one control plane URL")
        self._index = 0
        self._failed_in_row = 0
        # bootstrap token proving this sidecar's identity; the control plane renews it in
        # each answer's x-diktyo-token header
        self.token = token
        self.node_id = node_id
        self.on_snapshot = on_snapshot
        self.poll_timeout = poll_timeout
        self.backoff = Backoff(backoff_base, backoff_cap, rng)
        self.snapshot: Snapshot | None = None  # last good snapshot
        self.version = ""  # version of the last snapshot received (good or rejected)
        self.connected = False
        self.rejected = False  # whether ``version`` was NACKed
        self.last_error = ""
        self.stats = {
            "received": 0,
            "acked": 0,
            "nacked": 0,
            "errors": 0,
            "reconnects": 0,
            "failovers": 0,
        }
        self.first_snapshot = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The control plane (replica) this client talks to now."""
        return self.urls[self._index]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Run in the background (owned task; ``close()`` cancels it)."""
        self._task = asyncio.get_running_loop().create_task(
            self.run(), name=f"config-client-{self.node_id}"
        )
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def wait_ready(self, timeout: float | None = None) -> Snapshot:
        """Wait for the first good snapshot."""
        await asyncio.wait_for(self.first_snapshot.wait(), timeout)
        assert self.snapshot is not None
        return self.snapshot

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.poll_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    await self._poll_once(session)
                    self.backoff.reset()
                    self._failed_in_row = 0
                except asyncio.CancelledError:
                    raise
                except (aiohttp.ClientError, TimeoutError, OSError, _Unavailable) as exc:
                    self._went_away(str(exc) or type(exc).__name__)
                    self._failed_in_row += 1
                    if len(self.urls) > 1:
                        self._fail_over()
                        if self._failed_in_row < len(self.urls):
                            await asyncio.sleep(0.02)  # the next replica, almost at once
                            continue
                        self._failed_in_row = 0
                    await asyncio.sleep(self.backoff.next())

    def _fail_over(self) -> None:
        old = self.url
        self._index = (self._index + 1) % len(self.urls)
        self.stats["failovers"] += 1
        log.warning("control plane %s failed; moving to replica %s", old, self.url)

    def _went_away(self, why: str) -> None:
        if self.connected:
            log.warning(
                "control plane %s unreachable (%s); keeping snapshot %s",
                self.url,
                why,
                self.version or "none",
            )
            self.stats["reconnects"] += 1
        self.connected = False
        self.last_error = why
        self.stats["errors"] += 1

    async def _poll_once(self, session: aiohttp.ClientSession) -> None:
        params = {"node": self.node_id, "version": self.version}
        if self.version and self.rejected:
            params["rejected"] = "1"  # so a restarted control plane knows it was NACKed
        async with session.get(
            self.url + "/v1/snapshot", params=params, headers=self._auth()
        ) as resp:
            self.token = resp.headers.get("x-diktyo-token") or self.token
            if resp.status == 204:
                self.connected = True
                return
            body = await resp.read()
            if resp.status != 200:
                raise _Unavailable(f"HTTP {resp.status}: {body[:300].decode(errors='replace')}")
        self.connected = True
        self.stats["received"] += 1
        version = resp.headers.get("x-diktyo-version", "")
        error = ""
        snap: Snapshot | None = None
        try:
            snap = decode(body)
            version = snap.version or version
            result = self.on_snapshot(snap)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to apply is a NACK
            error = str(exc) or type(exc).__name__
        self.version = version
        self.rejected = bool(error)
        if error:
            self.stats["nacked"] += 1
            log.warning(
                "rejected snapshot %s: %s (keeping %s)",
                version,
                error,
                self.snapshot.version if self.snapshot else "none",
            )
        else:
            self.stats["acked"] += 1
            self.snapshot = snap
            self.first_snapshot.set()
        await self._ack(session, version, error)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _ack(self, session: aiohttp.ClientSession, version: str, error: str) -> None:
        payload = {"node": self.node_id, "version": version, "ok": not error, "error": error}
        try:
            async with session.post(
                self.url + "/v1/ack", json=payload, headers=self._auth()
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("ack of %s not delivered: %s", version, exc)


class _Unavailable(Exception):
    """The control plane answered but cannot serve this node right now."""

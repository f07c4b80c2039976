"""Periodic scraping of sidecars' ``/stats/prometheus`` into a :class:`MetricStore` (async shell).

Runs in the control plane, so it speaks HTTP through aiohttp, the control side's one client:
one session per scraper, connections to sidecars' admin ports kept alive between rounds, at
most ``concurrency`` at a time, each exposition capped at :data:`MAX_BODY` bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import aiohttp

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.telemetry.store import MetricStore

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024  # bytes of one sidecar's exposition; more is refused

Targets = Callable[[], Iterable[tuple[str, str]]]
"""Returns (instance name, URL of the sidecar's /stats/prometheus) pairs, asked each round."""


class Scraper:
    """Scrapes every target each ``interval`` seconds; one owned task, cancelled by ``close()``."""

    def __init__(
        self,
        store: MetricStore,
        targets: Targets,
        interval: float = 5.0,
        timeout: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        concurrency: int = 32,
    ) -> None:
        self.store = store
        self.targets = targets
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.concurrency = concurrency
        self._sem = asyncio.Semaphore(concurrency)
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.rounds = 0
        self._known: set[str] = set()
        self._seen_up: set[str] = set()  # scraped at least once: a failure now is news

    async def _one(self, instance: str, url: str) -> bool:
        async with self._sem:
            try:
                status, body = await self._get(url)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                self.failures += 1
                # a sidecar that is still starting is not worth a warning; one that answered
                # before and stopped answering is
                level = logging.WARNING if instance in self._seen_up else logging.DEBUG
                log.log(level, "scrape of %s (%s) failed: %s", instance, url, e)
                return False
        if status != 200:
            self.failures += 1
            log.warning("scrape of %s (%s) answered HTTP %d", instance, url, status)
            return False
        self.store.ingest(instance, body.decode("utf-8", "replace"), self.clock.time())
        self._seen_up.add(instance)
        return True

    async def _get(self, url: str) -> tuple[int, bytes]:
        http = self._http
        if http is None or http.closed:
            http = self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )
        async with http.get(url) as resp:
            if (resp.content_length or 0) > MAX_BODY:
                raise ValueError(f"exposition of {resp.content_length} bytes > {MAX_BODY}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_BODY:
                    raise ValueError(f"exposition larger than {MAX_BODY} bytes")
            return resp.status, bytes(body)

    async def scrape_once(self) -> int:
        """One round over all targets; returns how many succeeded."""
        targets = list(self.targets())
        current = {name for name, _ in targets}
        for gone in self._known - current:
            self.store.forget(gone)
            self._seen_up.discard(gone)
        self._known = current
        results = await asyncio.gather(*(self._one(n, u) for n, u in targets))
        self.rounds += 1
        return sum(results)

    async def _run(self) -> None:
        while True:
            try:
                await self.scrape_once()
            except Exception:  # a bad target list must not end scraping for good
                log.exception("scrape round failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="telemetry-scraper"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        http, self._http = self._http, None
        if http is not None:
            await http.close()

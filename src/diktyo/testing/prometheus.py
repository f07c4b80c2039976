"""A real Prometheus server for tests: scrapes an exposition served on 127.0.0.1, answers PromQL.

``async with prometheus_scraping(render_fn, tmp_path) as prom:`` serves ``render_fn()`` at
``/stats/prometheus`` on a free port, starts Debian's ``prometheus`` binary scraping it every
second, and yields a :class:`RunningPrometheus` with ``query(expr)``. Both are stopped on exit.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from diktyo.platform.ports import free_port
from diktyo.telemetry.exposition import CONTENT_TYPE
from diktyo.telemetry.httpclient import request
from diktyo.telemetry.prometheus_config import scrape_config

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)


@dataclass
class RunningPrometheus:
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text()[-n:]

    async def query(self, expr: str) -> tuple[str, list[Any]]:
        """``(status, result)`` of an instant PromQL query."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={quote(expr)}"
        _, body = await request("GET", url, timeout=5)
        data = json.loads(body)
        return data["status"], data.get("data", {}).get("result", [])


@asynccontextmanager
async def prometheus_scraping(
    render_fn: Callable[[], str], tmp_path: Path
) -> AsyncIterator[RunningPrometheus]:
    assert PROMETHEUS is not None, "prometheus is not installed (apt-get install prometheus)"

    async def stats(_: web.Request) -> web.Response:
        return web.Response(text=render_fn(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/stats/prometheus", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sport = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(scrape_config([f"127.0.0.1:{sport}"], scrape_interval="1s"))
    pport = free_port()
    log_path = tmp_path / "prometheus.log"
    log = log_path.open("w")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{pport}", stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield RunningPrometheus(pport, proc, log_path)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        await runner.cleanup()

"""Fixtures for the sample apps: real app processes on 127.0.0.1 and a tiny recording server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from sample_helpers import Recorder, StartApp

from diktyo.samples.launch import SampleProcess, start_sample


def _starter(log_dir: Path) -> tuple[StartApp, list[SampleProcess]]:
    started: list[SampleProcess] = []

    def start(module: str, name: str | None = None, **env: str) -> SampleProcess:
        short = name or module.rsplit(".", 1)[-1]
        env.setdefault("NO_PROXY", "localhost,127.0.0.1")
        app = start_sample(
            f"diktyo.samples.{module}", log_path=log_dir / f"{short}-{len(started)}.log", env=env
        )
        started.append(app)
        return app

    return start, started


def _stop_all(started: list[SampleProcess]) -> None:
    codes = {app.log_path.name: app.stop() for app in started}
    # every app exits cleanly on SIGTERM
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[StartApp]:
    """``start_app("bookinfo.reviews", SERVICE_VERSION="v2", ...)`` -> a running SampleProcess."""
    start, started = _starter(tmp_path)
    yield start
    _stop_all(started)


@pytest.fixture(scope="module")
def start_module_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartApp]:
    """Like ``start_app``, for apps shared by the tests of one module."""
    start, started = _starter(tmp_path_factory.mktemp("apps"))
    yield start
    _stop_all(started)


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    yield rec
    await runner.cleanup()

"""Runs a bounded load: ``connections`` workers, each with its own schedule, one recorder."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from diktyo.core.clock import SYSTEM_CLOCK, Clock
from diktyo.load.client import Connection, ResponseError, Target, connect
from diktyo.load.schedule import Schedule, split_requests
from diktyo.load.stats import DEFAULT_PERCENTILES, LatencySummary, Recorder

ProgressFn = Callable[[float, int], None]


def code_is_ok(status: int) -> bool:
    """fortio's "ok" codes (2xx and 418): after any other answer fortio closes its connection
    and the next request opens a new one (its "Sockets used" line counts them)."""
    return 200 <= status <= 299 or status == 418


@dataclass(frozen=True, slots=True)
class LoadOptions:
    url: str
    connections: int = 8
    requests: int | None = 100
    duration: float | None = None  # seconds
    qps: float = 0.0  # 0: as fast as possible
    headers: tuple[tuple[str, str], ...] = ()
    use_proxy: bool = True  # honour HTTP_PROXY / NO_PROXY from env
    timeout: float = 3.0  # per request (and per connect), like fortio's default
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES


@dataclass(frozen=True, slots=True)
class LoadResult:
    url: str
    proxy: str | None
    connections: int
    requested_qps: float
    elapsed: float  # seconds from the first request to the last response
    count: int
    codes: dict[int, int]
    errors: dict[str, int]
    latency: LatencySummary
    sockets: int  # connections opened (== connections with perfect keep-alive)

    @property
    def qps(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0


async def run_load(
    options: LoadOptions,
    *,
    env: Mapping[str, str] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    progress: ProgressFn | None = None,
    progress_interval: float = 1.0,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Run the load described by ``options``; ``env`` is where proxy settings come from
    (None: no proxy). ``progress(elapsed_seconds, requests_done)`` is called every interval.
    Setting ``stop`` ends the run early: requests in flight finish, the result covers them.
    """
    if options.connections < 1:
        raise ValueError(f"connections must be >= 1, got {options.connections}")
    target = Target.build(
        options.url, headers=options.headers, env=env if options.use_proxy else None
    )
    start = clock.monotonic()
    schedules = [
        Schedule(
            start=start,
            requests=share,
            duration=options.duration,
            qps=options.qps / options.connections,
        )
        for share in split_requests(options.requests, options.connections)
    ]
    recorder = Recorder()
    sockets = 0

    async def worker(schedule: Schedule) -> None:
        nonlocal sockets
        conn: Connection | None = None
        try:
            while True:
                now = clock.monotonic()
                due = schedule.next(now)
                if due is None:
                    return
                if due > now:
                    await asyncio.sleep(due - now)
                sent = clock.monotonic()
                try:
                    if conn is None or conn.closed:
                        conn = None
                        conn = await connect(target, options.timeout)
                        sockets += 1
                    status = await conn.request(options.timeout)
                except ResponseError as exc:
                    recorder.record_error(str(exc), clock.monotonic() - sent)
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                except TimeoutError:
                    recorder.record_error("timeout", clock.monotonic() - sent)
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                recorder.record(status, clock.monotonic() - sent)
                if not conn.keep_alive or not code_is_ok(status):
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    async def report_progress() -> None:
        assert progress is not None
        while True:
            await asyncio.sleep(progress_interval)
            progress(clock.monotonic() - start, recorder.count)

    async def stop_when_asked() -> None:
        assert stop is not None
        await stop.wait()
        for schedule in schedules:
            schedule.stop()

    helpers = []
    if progress is not None:
        helpers.append(asyncio.create_task(report_progress()))
    if stop is not None:
        helpers.append(asyncio.create_task(stop_when_asked()))
    try:
        async with asyncio.TaskGroup() as group:
            for schedule in schedules:
                group.create_task(worker(schedule))
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    elapsed = clock.monotonic() - start
    return LoadResult(
        url=options.url,
        proxy=target.proxy,
        connections=options.connections,
        requested_qps=options.qps,
        elapsed=elapsed,
        count=recorder.count,
        codes=dict(sorted(recorder.codes.items())),
        errors=dict(recorder.errors.most_common()),
        latency=recorder.summary(options.percentiles),
        sockets=sockets,
    )

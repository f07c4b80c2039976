"""A large config never stalls the control plane's event loop: loading, analysis and
translation run in worker threads while ``/healthz``, long polls and ACKs keep answering."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp

from diktyo.control.model import Service, ServicePort
from diktyo.control.server import ControlPlane
from diktyo.testing.controlplane import YAML, admin_session

SVC = Service(hostname="a.default.svc.cluster.local", short_name="a", ports=(ServicePort(80),))


def virtual_services(n: int) -> str:
    return "".join(
        f"---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: vs{i}}}\nspec:\n  hosts: [svc{i}]\n  http:\n"
        f"  - match: [{{uri: {{prefix: /a}}}}]\n    route:\n"
        f"    - destination: {{host: svc{i}}}\n"
        for i in range(n)
    )


async def _health_until(url: str, done: asyncio.Future[object], log: list[float]) -> None:
    """GET /healthz in a loop until ``done``; append the time of each answer."""
    async with aiohttp.ClientSession() as s:
        while not done.done():
            async with s.get(url + "/healthz") as r:
                assert r.status == 200
                await r.read()
            log.append(time.monotonic())
            await asyncio.sleep(0.01)  # real time: probe pacing


async def test_health_answers_while_a_big_apply_is_loaded_and_analyzed() -> None:
    cp = ControlPlane(observability=False)
    await cp.start()
    body = virtual_services(1000)
    try:
        async with admin_session(cp) as s:

            async def apply() -> tuple[int, float]:
                async with s.post(
                    cp.url + "/v1/config?source=big.yaml", data=body, headers=YAML
                ) as r:
                    await r.read()
                    return r.status, time.monotonic()

            started = time.monotonic()
            task = asyncio.ensure_future(apply())
            answers: list[float] = []
            await _health_until(cp.url, task, answers)
            status, finished = await task
        assert status == 200
        assert len(cp.store.resources) == 1000
        # the loop answered health checks while the apply was still being processed
        during = [t for t in answers if started < t < finished]
        assert len(during) >= 3, (len(answers), finished - started)
    finally:
        await cp.stop()


async def test_health_answers_while_translation_runs(translate, make_proxy) -> None:
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow_translate(p, push):  # type: ignore[no-untyped-def]
        """The real (tiny) translator, made as slow as translating a huge config is."""
        start = time.monotonic()
        time.sleep(0.4)  # real time: blocks whichever thread translates, as heavy translation does
        snap = translate(p, push)
        with lock:
            spans.append((start, time.monotonic()))
        return snap

    cp = ControlPlane(
        translator=slow_translate, observability=False, debounce=60.0, debounce_max=60.0
    )  # only the push started below runs
    await cp.start()
    try:
        for i in range(3):
            cp.add_proxy(make_proxy(i))
        versions = {i: cp.cache.get(make_proxy(i).node.id).version for i in range(3)}
        cp.registry.add_service(SVC)  # a change: every proxy gets a new snapshot
        spans.clear()
        push = asyncio.ensure_future(cp.push_async(chunk=1))
        answers: list[float] = []
        await _health_until(cp.url, push, answers)
        await push
        assert len(spans) == 3
        inside = [t for t in answers for (a, b) in spans if a < t < b]
        assert len(inside) >= 2, (answers, spans)
        assert all(cp.cache.get(make_proxy(i).node.id).version != versions[i] for i in range(3))
    finally:
        await cp.stop()

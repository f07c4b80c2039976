"""The control plane in parts: analysis once per change, the dashboard mounting itself."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import diktyo.control.validate as validate
from diktyo.control.server import ControlPlane
from diktyo.dashboard import mount as mount_dashboard
from diktyo.testing.controlplane import YAML, admin_session

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
"""
DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
"""


def _count_analyses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of resources of every run of the analyzers."""
    calls: list[int] = []
    real = validate.analyze

    def counting(resources: Any, registry: Any = None) -> Any:
        calls.append(len(tuple(resources)))
        return real(resources, registry)

    monkeypatch.setattr(validate, "analyze", counting)
    return calls


async def test_an_apply_and_the_push_after_it_analyze_the_config_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the split, an apply analyzed the store before and after the change, and the push
    that followed analyzed the same config a third time."""
    calls = _count_analyses(monkeypatch)
    cp = ControlPlane(observability=False, debounce=60.0, debounce_max=60.0)
    await cp.start()  # the first push analyzes the empty config
    try:
        assert calls == [0]
        async with admin_session(cp) as s:
            for n, text in enumerate((VS, DR), start=1):
                calls.clear()
                async with s.post(cp.url + "/v1/config", data=text, headers=YAML) as r:
                    assert r.status == 200, await r.text()
                await cp.push_async()  # the push of this change, as the push loop runs it
                cp.push_now()  # and another push of the same config (cp.sync does this)
                assert calls == [n], f"analysis ran {len(calls)} times for one change"
                async with s.get(cp.url + "/v1/config") as r:
                    assert (await r.json())["push_version"] == cp.push.push_version
        assert cp.push.analysis.runs == 3
    finally:
        await cp.stop()


async def test_a_rejected_apply_analyzes_once_and_the_store_keeps_its_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_analyses(monkeypatch)
    cp = ControlPlane(observability=False, debounce=60.0, debounce_max=60.0)
    await cp.start()
    try:
        calls.clear()
        bad = VS.replace("{host: reviews}", "{host: reviews, subset: nope}")
        async with (
            admin_session(cp) as s,
            s.post(cp.url + "/v1/config", data=bad, headers=YAML) as r,
        ):
            body = await r.json()
            assert r.status == 400 and any("nope" in e for e in body["errors"]), body
        assert calls == [1] and cp.store.resources == ()
    finally:
        await cp.stop()


async def test_without_a_dashboard_the_root_page_says_so() -> None:
    cp = ControlPlane(observability=False)
    assert not mount_dashboard(cp)  # no observability: nothing for a dashboard to show
    await cp.start()
    try:
        async with admin_session(cp) as s:
            async with s.get(cp.url + "/") as r:
                assert r.status == 200 and "No dashboard is mounted" in await r.text()
            async with s.get(cp.url + "/api/config") as r:
                assert r.status == 404
    finally:
        await cp.stop()


async def test_the_dashboard_mounts_itself_on_the_api_app() -> None:
    cp = ControlPlane()
    assert mount_dashboard(cp)
    await cp.start()
    try:
        async with admin_session(cp) as s:
            async with s.get(cp.url + "/") as r:
                text = await r.text()
                assert r.status == 200 and "No dashboard" not in text and "<html" in text.lower()
            async with s.get(cp.url + "/api/config") as r:
                assert r.status == 200 and "control_plane" in await r.json()
            async with s.get(cp.url + "/api/resilience") as r:
                assert r.status == 200 and await r.json() == []
    finally:
        await cp.stop()
        cp.close()


def test_the_control_plane_runs_without_importing_the_dashboard() -> None:
    code = (
        "import sys, asyncio\n"
        "from diktyo.control.server import ControlPlane\n"
        "async def main():\n"
        "    cp = ControlPlane()\n"
        "    await cp.start()\n"
        "    await cp.stop()\n"
        "asyncio.run(main())\n"
        "assert 'diktyo.dashboard' not in sys.modules, 'control imported the dashboard'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

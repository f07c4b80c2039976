"""The data plane outlives its control plane: Bookinfo under steady load while the control plane is down.

In the local platform the control plane runs inside the supervisor process (``diktyo up``;
``LocalMesh.cp``), so killing that process would kill the whole mesh. What a sidecar sees of a
control plane crash is its API going away and coming back: the test stops the control plane's
server and every task of it (``ControlPlane.stop()``: long polls cut, push, health and scrape
loops ended, port closed), changes the config meanwhile, and starts it again on the same port.
Requests must keep succeeding on the last good snapshots, and after the restart every sidecar
must be SYNCED on the new config.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.testing import eventually_sync
from diktyo.testing.controlplane import admin_get

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"
SERVED_BY = re.compile(r"Reviews served by:\s*(?:<[^>]*>)?\s*([a-z0-9-]+)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def control_plane_up(url: str) -> bool:
    try:
        return get(url + "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(BOOKINFO / "mesh.yaml", gateway_host_port=0) as m:
        for name in (
            "bookinfo-gateway.yaml",
            "destination-rule-all.yaml",
            "virtual-service-all-v1.yaml",
        ):
            m.apply_file(NET / name)
        m.wait_synced()
        yield m


def proxies(mesh: MeshThread) -> list[dict[str, object]]:
    status, body = admin_get(mesh, mesh.url + "/v1/proxies")
    assert status == 200, body
    return json.loads(body)["proxies"]  # type: ignore[no-any-return]


def test_requests_succeed_while_the_control_plane_is_down(mesh: MeshThread) -> None:
    assert mesh.mesh is not None
    cp = mesh.mesh.cp
    url = mesh.url
    port = urlsplit(url).port
    results: list[tuple[float, int, str]] = []
    last_started: dict[int, float] = {}  # per load thread: when its newest answered page began
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set() and len(results) < 3000:
            started = time.monotonic()
            status, body = get(mesh.gateway_url + "/productpage")
            m = SERVED_BY.search(body) if status == 200 else None
            results.append((time.monotonic(), status, m.group(1) if m else body[:200]))
            last_started[i] = started

    workers = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)  # real time: traffic runs before the control plane stops
        mesh.call(cp.stop())
        down_at = time.monotonic()
        assert not control_plane_up(url)
        # config changes while the control plane is down are kept and pushed on restart
        mesh.apply_file(NET / "virtual-service-reviews-v3.yaml")
        time.sleep(3.0)  # real time: sidecars retry with backoff (cap 5 s) and keep their snapshots
        eventually_sync(  # a loaded machine answers fewer pages in those 3 s: wait for 10
            lambda: len([r for r in results if r[0] > down_at]) >= 10,
            timeout=30,
            what=lambda: f"10 pages while the control plane is down: {results[-3:]}",
        )
        up_at = time.monotonic()
        assert mesh.call(cp.start(port=port)) == url
        assert control_plane_up(url)
        mesh.wait_synced(20)
        synced_at = time.monotonic()
        time.sleep(1.0)  # real time: traffic keeps flowing after the restart
        # every load thread's newest answered page began after the sync, so the page answered
        # last (results[-1]) was routed on the new config, however slow pages are here
        eventually_sync(
            lambda: all(last_started.get(i, 0.0) > synced_at for i in range(2)),
            timeout=30,
            what=lambda: f"a page begun after the sync on each thread: {results[-3:]}",
        )
    finally:
        stop.set()
        for w in workers:
            w.join(15)

    failed = [r for r in results if r[1] != 200]
    assert failed == [], failed[:5]
    during = [r for r in results if down_at < r[0] < up_at]
    assert len(during) >= 10, len(during)
    assert {r[2] for r in during} == {"reviews-v1-1"}  # the last good snapshot kept serving
    assert results[-1][2] == "reviews-v3-1"  # the change made while down arrived after restart
    states = {p["node"]: p["state"] for p in proxies(mesh)}
    assert len(states) == 7 and set(states.values()) == {"SYNCED"}, states
    # the sidecars long-poll the restarted control plane again
    eventually_sync(
        lambda: all(p["connected"] for p in proxies(mesh)),
        timeout=15,
        interval=0.2,
        what=lambda: f"all sidecars connected: {proxies(mesh)}",
    )


def test_telemetry_store_works_after_a_control_plane_restart(mesh: MeshThread) -> None:
    assert mesh.mesh is not None
    cp = mesh.mesh.cp
    port = urlsplit(mesh.url).port
    mesh.call(cp.stop())
    mesh.call(cp.start(port=port))
    mesh.wait_synced()
    status, body = admin_get(mesh, mesh.url + "/telemetry/api/traces?limit=5")
    assert status == 200, body[:300]

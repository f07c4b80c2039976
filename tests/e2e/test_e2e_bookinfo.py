"""Bookinfo on a local mesh (real control plane, sidecars, gateway and apps): Istio's routing tasks."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.testing import eventually_sync
from diktyo.testing.controlplane import admin_get

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"
SERVED_BY = re.compile(r"Reviews served by:\s*(?:<[^>]*>)?\s*([a-z0-9-]+)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def page(mesh: MeshThread, user: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(mesh.gateway_url + "/productpage")
    if user:
        req.add_header("Cookie", f"session={user}")
    try:
        with _opener.open(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def served_by(body: str) -> str:
    m = SERVED_BY.search(body)
    assert m, body[-600:]
    return m.group(1)


@pytest.fixture
def mesh(bookinfo_baseline: MeshThread) -> MeshThread:
    """The shared Bookinfo mesh (tests/e2e/conftest.py), reset to its baseline around each test."""
    return bookinfo_baseline


def test_all_v1(mesh: MeshThread) -> None:
    for _ in range(10):
        status, body = page(mesh)
        assert status == 200
        assert served_by(body) == "reviews-v1-1"
        assert "unavailable" not in body


def test_jason_goes_to_v2_by_end_user_header(mesh: MeshThread) -> None:
    mesh.apply_file(NET / "virtual-service-reviews-test-v2.yaml")
    mesh.wait_synced()
    for _ in range(5):
        status, body = page(mesh, user="jason")
        assert status == 200 and served_by(body) == "reviews-v2-1"
        status, body = page(mesh, user="alice")
        assert status == 200 and served_by(body) == "reviews-v1-1"
        status, body = page(mesh)
        assert status == 200 and served_by(body) == "reviews-v1-1"


def test_fifty_fifty_split(mesh: MeshThread) -> None:
    mesh.apply_file(NET / "virtual-service-reviews-50-v3.yaml")
    mesh.wait_synced()
    n = 100
    seen = Counter(served_by(page(mesh)[1]) for _ in range(n))
    assert set(seen) == {"reviews-v1-1", "reviews-v3-1"}, seen
    # binomial(100, 0.5): sd 5; 30..70 is +-4 sd (false failure rate ~6e-5)
    assert 30 <= seen["reviews-v3-1"] <= 70, seen


def test_config_changes_under_steady_load_fail_no_request(mesh: MeshThread) -> None:
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() and len(results) < 2000:
            status, body = page(mesh)
            results.append((status, served_by(body) if status == 200 else body[:200]))

    def pages_served(n: int) -> None:
        """``n`` more pages answered under the current config (slow on a loaded machine)."""
        want = len(results) + n
        eventually_sync(
            lambda: len(results) >= want or not any(w.is_alive() for w in workers),
            timeout=30,
            interval=0.05,
            what=lambda: f"{want} pages answered ({len(results)} so far)",
        )

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for name in (
            "virtual-service-reviews-50-v3.yaml",
            "virtual-service-reviews-v3.yaml",
            "virtual-service-all-v1.yaml",
            "virtual-service-reviews-50-v3.yaml",
        ):
            pages_served(10)  # load before (and between) the changes
            mesh.apply_file(NET / name)
            mesh.wait_synced()
        pages_served(10)  # and after the last
    finally:
        stop.set()
        for w in workers:
            w.join(15)
    failed = [r for r in results if r[0] != 200]
    assert len(results) >= 20
    assert failed == [], failed[:5]
    assert {r[1] for r in results} >= {"reviews-v1-1", "reviews-v3-1"}


def test_dashboard_shows_graph_resilience_and_config(mesh: MeshThread) -> None:
    import json

    assert mesh.mesh is not None and mesh.mesh.cp._scraper is not None
    scrape = mesh.mesh.cp._scraper.scrape_once
    assert mesh.call(scrape()) == 7  # every sidecar and the gateway (a baseline: rates are deltas)
    for _ in range(5):
        assert page(mesh)[0] == 200

    def api(path: str) -> object:
        status, body = admin_get(mesh, mesh.url + path)
        assert status == 200, body[:300]
        return json.loads(body)

    want = {"default/productpage-v1", "default/reviews-v1", "istio-system/istio-ingressgateway"}
    nodes: set[str] = set()

    def graph_has_the_pages() -> bool:
        assert mesh.call(scrape()) == 7  # a scrape after the pages (another adds no delta)
        graph = api("/api/graph?window=60")
        assert isinstance(graph, dict)
        nodes.clear()
        nodes.update(n["id"] for n in graph["nodes"])
        return want <= nodes

    eventually_sync(graph_has_the_pages, timeout=10, interval=0.2, what=lambda: f"{want} <= {nodes}")

    status, body = admin_get(mesh, mesh.url + "/")
    assert status == 200 and "<html" in body.lower()
    cards = api("/api/resilience")
    assert isinstance(cards, list)
    assert any(
        c["workload"] == "productpage-v1"
        and c["cluster"] == "outbound|9080|v1|details.default.svc.cluster.local"
        for c in cards
    ), cards
    config = api("/api/config")
    assert isinstance(config, dict)
    kinds = {r["kind"] for r in config["resources"]}
    assert {"Gateway", "VirtualService", "DestinationRule"} <= kinds


def test_fault_abort_for_jason_only(mesh: MeshThread) -> None:
    """Istio's fault injection task: ratings answers 500 for jason; the page still renders."""
    mesh.apply_file(NET / "virtual-service-reviews-test-v2.yaml")
    mesh.apply_file(NET / "virtual-service-ratings-test-abort.yaml")
    mesh.wait_synced()
    try:
        status, body = page(mesh, user="jason")
        assert status == 200 and served_by(body) == "reviews-v2-1"
        assert "Ratings service is currently unavailable" in body
        status, body = page(mesh, user="alice")
        assert status == 200 and "Ratings service is currently unavailable" not in body
    finally:
        mesh.delete_text((NET / "virtual-service-ratings-test-abort.yaml").read_text())


def test_fault_delay_exceeds_productpage_timeout(mesh: MeshThread) -> None:
    """Istio's task: a 7 s ratings delay for jason; productpage gives up on reviews after 2 x 3 s."""
    mesh.apply_file(NET / "virtual-service-reviews-test-v2.yaml")
    mesh.apply_file(NET / "virtual-service-ratings-test-delay.yaml")
    mesh.wait_synced()
    try:
        start = time.monotonic()
        status, body = page(mesh, user="jason")
        elapsed = time.monotonic() - start
        assert status == 200
        assert "Sorry, product reviews are currently unavailable for this book." in body
        assert elapsed >= 5.5, elapsed  # 3 s timeout and one retry: about 6 s, as in Istio's docs
    finally:
        mesh.delete_text((NET / "virtual-service-ratings-test-delay.yaml").read_text())

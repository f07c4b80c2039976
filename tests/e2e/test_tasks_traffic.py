"""Istio's traffic tasks on a local Bookinfo mesh: traffic shifting, request timeouts, ingress.

Each test follows the task's steps with the task's own YAML (``samples/bookinfo/networking``)
and asserts what Istio's docs promise the user sees.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"
SERVED_BY = re.compile(r"Reviews served by:\s*(?:<[^>]*>)?\s*([a-z0-9-]+)")
SORRY_REVIEWS = "Sorry, product reviews are currently unavailable for this book."

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def page(mesh: MeshThread) -> tuple[int, str]:
    return get(mesh.gateway_url + "/productpage")


def served_by(body: str) -> str:
    m = SERVED_BY.search(body)
    assert m, body[-600:]
    return m.group(1)


def stars(body: str) -> set[str]:
    """Colours of the rating stars on the page (none for reviews v1)."""
    return set(re.findall(r'<font color="([a-z]+)">[★☆]+</font>', body))


def ut_count(mesh: MeshThread) -> float:
    """productpage's ``istio_requests_total`` to reviews with 504 UT (upstream request timeout)."""
    admin = next(w for w in mesh.describe()["workloads"] if w["name"] == "productpage-v1-1")
    status, text = get(f"http://127.0.0.1:{admin['admin_port']}/stats/prometheus")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("istio_requests_total{")
        and 'reporter="source"' in line
        and 'destination_service="reviews.default.svc.cluster.local"' in line
        and 'response_code="504"' in line
        and 'response_flags="UT"' in line
    )


@pytest.fixture
def mesh(bookinfo_baseline: MeshThread) -> MeshThread:
    """The shared Bookinfo mesh (tests/e2e/conftest.py), reset to its baseline around each test."""
    return bookinfo_baseline


def test_traffic_shifting_v1_then_fifty_fifty_v3_then_all_v3(mesh: MeshThread) -> None:
    """Istio's traffic shifting task: all v1 -> 50 % v3 -> 100 % v3."""
    for _ in range(10):
        status, body = page(mesh)
        assert status == 200 and served_by(body) == "reviews-v1-1"
        assert stars(body) == set()  # v1 shows no ratings

    mesh.apply_file(NET / "virtual-service-reviews-50-v3.yaml")
    mesh.wait_synced()
    n = 100
    seen: Counter[str] = Counter()
    for _ in range(n):
        status, body = page(mesh)
        assert status == 200
        who = served_by(body)
        seen[who] += 1
        assert stars(body) == ({"red"} if who == "reviews-v3-1" else set()), who
    assert set(seen) == {"reviews-v1-1", "reviews-v3-1"}, seen
    # binomial(100, 0.5): sd 5; 30..70 is +-4 sd (false failure rate ~6e-5)
    assert 30 <= seen["reviews-v3-1"] <= 70, seen

    mesh.apply_file(NET / "virtual-service-reviews-v3.yaml")
    mesh.wait_synced()
    for _ in range(20):
        status, body = page(mesh)
        assert status == 200 and served_by(body) == "reviews-v3-1"
        assert stars(body) == {"red"}


def test_request_timeouts(mesh: MeshThread) -> None:
    """Istio's request timeouts task: ratings delayed 2 s; reviews (v2) given 0.5 s."""
    mesh.apply_file(NET / "virtual-service-ratings-delay-2s.yaml")
    mesh.apply_file(NET / "virtual-service-reviews-v2.yaml")
    mesh.wait_synced()
    try:
        # step 1: without a timeout the page works but takes about 2 s (black stars, v2)
        start = time.monotonic()
        status, body = page(mesh)
        elapsed = time.monotonic() - start
        assert status == 200 and served_by(body) == "reviews-v2-1"
        assert stars(body) == {"black"} and SORRY_REVIEWS not in body
        assert 1.9 <= elapsed < 4.0, elapsed

        # step 2: reviews must answer within 0.5 s; productpage tries twice -> about 1 s
        mesh.apply_file(NET / "virtual-service-reviews-timeout.yaml")
        mesh.wait_synced()
        before = ut_count(mesh)
        timings = []
        for _ in range(3):
            start = time.monotonic()
            status, body = page(mesh)
            timings.append(time.monotonic() - start)
            assert status == 200
            assert SORRY_REVIEWS in body
        # 2 x 0.5 s plus the details call and rendering; well under the 2 s delay
        assert all(0.95 <= t < 1.8 for t in timings), timings
        # productpage's sidecar reports each timed-out try: 504 with flag UT (2 tries per page)
        assert ut_count(mesh) - before == 6
    finally:
        mesh.delete_text((NET / "virtual-service-ratings-delay-2s.yaml").read_text())
        mesh.wait_synced()


def test_ingress_gateway_routes_only_the_bound_paths(mesh: MeshThread) -> None:
    """Istio's ingress task: the Gateway + bound VirtualService expose /productpage, nothing else."""
    status, body = page(mesh)
    assert status == 200 and "Reviews served by" in body
    status, _ = get(mesh.gateway_url + "/api/v1/products")
    assert status == 200  # a prefix match of the gateway VirtualService
    for path in ("/", "/health", "/details/0", "/productpagex"):
        status, body = get(mesh.gateway_url + path)
        assert status == 404, (path, status, body[:200])


def test_ingress_gateway_without_virtual_service_answers_404(mesh: MeshThread) -> None:
    """Remove the gateway's VirtualService: the gateway no longer routes /productpage."""
    gw = (NET / "bookinfo-gateway.yaml").read_text()
    vs_only = gw.split("---", 1)[1]
    mesh.delete_text(vs_only)
    mesh.wait_synced()
    try:
        status, _ = page(mesh)
        assert status == 404
    finally:
        mesh.apply_file(NET / "bookinfo-gateway.yaml")
        mesh.wait_synced()
    assert page(mesh)[0] == 200

"""Istio's observability tasks on a local Bookinfo mesh: metrics and distributed traces.

After N product pages through the ingress gateway, every sidecar's ``/stats/prometheus`` counts
exactly what was sent (per reporter, destination version and response code), the control
plane's embedded store agrees, and a real Prometheus server scraping the sidecars with a config
from ``diktyo.telemetry.prometheus_config`` answers the task's PromQL. With 100 % sampling one
page gives one trace ingress -> productpage -> reviews -> ratings with correct parent ids.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
import pytest

from diktyo.platform.harness import MeshThread
from diktyo.telemetry.prometheus_config import Target, scrape_config
from diktyo.testing import eventually_sync, free_port
from diktyo.testing.controlplane import admin_get

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
NET = BOOKINFO / "networking"
SERVED_BY = re.compile(r"Reviews served by:\s*(?:<[^>]*>)?\s*([a-z0-9-]+)")
PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
SVC = "{}.default.svc.cluster.local"
N = 30  # product pages in the metrics test

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def page(mesh: MeshThread) -> str:
    status, body = get(mesh.gateway_url + "/productpage")
    assert status == 200, body[:300]
    return body


def requests_total(text: str) -> list[tuple[dict[str, str], float]]:
    """The ``istio_requests_total`` samples of one exposition, as (labels, value)."""
    out = []
    for line in text.splitlines():
        if line.startswith("istio_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            out.append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)), float(value)))
    return out


def count(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(v for got, v in samples if all(got.get(k) == w for k, w in labels.items()))


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(BOOKINFO / "mesh.yaml", gateway_host_port=0) as m:
        for name in (
            "bookinfo-gateway.yaml",
            "destination-rule-all.yaml",
            "virtual-service-reviews-50-v3.yaml",
        ):
            m.apply_file(NET / name)
        assert m.mesh is not None
        cp = m.mesh.cp

        def sample_everything() -> None:
            # meshConfig.defaultConfig.tracing.sampling: 100 (Istio's demo profile); the mesh
            # file has no field for it, so set it on the control plane and push
            tracing = msgspec.structs.replace(cp.mesh.tracing, sampling=100.0)
            cp.mesh = msgspec.structs.replace(cp.mesh, tracing=tracing)
            cp.kick()

        m.run(sample_everything)
        m.wait_synced()
        yield m


def sidecar_stats(mesh: MeshThread) -> dict[str, list[tuple[dict[str, str], float]]]:
    out = {}
    for w in mesh.describe()["workloads"]:
        status, text = get(f"http://127.0.0.1:{w['admin_port']}/stats/prometheus")
        assert status == 200
        out[w["name"]] = requests_total(text)
    return out


def test_metrics_count_every_request_per_reporter_version_and_code(mesh: MeshThread) -> None:
    assert mesh.mesh is not None and mesh.mesh.cp._scraper is not None
    scrape = mesh.mesh.cp._scraper.scrape_once
    assert mesh.call(scrape()) == 7  # a baseline: the store keeps deltas between scrapes
    served = Counter(SERVED_BY.search(page(mesh)).group(1) for _ in range(N))  # type: ignore[union-attr]
    assert set(served) == {"reviews-v1-1", "reviews-v3-1"}, served
    v1, v3 = served["reviews-v1-1"], served["reviews-v3-1"]

    s = sidecar_stats(mesh)
    ok = {"response_code": "200", "response_flags": "-"}
    # the gateway (source) and productpage (destination) each saw N page requests
    gw = s["istio-ingressgateway"]
    assert count(gw, reporter="source", destination_service=SVC.format("productpage"), **ok) == N
    assert count(gw) == N
    pp = s["productpage-v1-1"]
    assert count(pp, reporter="destination", destination_workload="productpage-v1", **ok) == N
    # productpage's calls (source), per destination version
    assert count(pp, reporter="source", destination_service=SVC.format("details"), **ok) == N
    for version, n in (("v1", v1), ("v3", v3)):
        assert (
            count(pp, reporter="source", destination_workload=f"reviews-{version}",
                  destination_version=version, destination_service=SVC.format("reviews"), **ok)
            == n
        )  # fmt: skip
    assert count(pp, reporter="source", destination_version="v2") == 0
    assert count(pp) == 3 * N  # nothing else: no errors, no retries
    # each callee's sidecar (destination) saw what its callers sent
    assert count(s["details-v1-1"], reporter="destination", **ok) == N
    assert count(s["reviews-v1-1"], reporter="destination", destination_version="v1", **ok) == v1
    assert count(s["reviews-v1-1"], reporter="source") == 0  # v1 never calls ratings
    assert count(s["reviews-v2-1"]) == 0
    assert count(s["reviews-v3-1"], reporter="destination", destination_version="v3", **ok) == v3
    assert count(s["reviews-v3-1"], reporter="source", destination_service=SVC.format("ratings"),
                 source_workload="reviews-v3", source_version="v3", **ok) == v3  # fmt: skip
    assert count(s["ratings-v1-1"], reporter="destination", **ok) == v3
    for name, samples in s.items():  # response codes other than 200: none anywhere
        assert all(lb["response_code"] == "200" for lb, _ in samples), name

    # the control plane's embedded store (scraped from the same sidecars) agrees
    assert mesh.call(scrape()) == 7

    def series_total(reporter: str, **match: str) -> tuple[int, dict[str, int]]:
        query = urlencode({"window": 600, "reporter": reporter, **match})
        status, body = admin_get(mesh, mesh.url + "/telemetry/api/metrics/series?" + query)
        assert status == 200, body
        points = json.loads(body)["points"]
        codes: Counter[str] = Counter()
        for p in points:
            codes.update({str(k): int(v) for k, v in p["codes"].items()})
        return sum(int(p["requests"]) for p in points), dict(codes)  # codes by class: 2xx

    reviews = SVC.format("reviews")
    assert series_total("source", destination_service=reviews) == (N, {"2xx": N})
    assert series_total("destination", destination_service=reviews) == (N, {"2xx": N})
    assert series_total("source", destination_service=reviews, destination_version="v3") == (
        v3,
        {"2xx": v3} if v3 else {},
    )
    assert series_total("destination", destination_service=SVC.format("ratings"))[0] == v3
    assert series_total("source", source_workload="istio-ingressgateway")[0] == N


def test_destination_reporter_knows_the_source_workload(mesh: MeshThread) -> None:
    """Istio's peer metadata: the callee's sidecar labels requests with the caller's identity."""
    mtls = {"reporter": "destination", "connection_security_policy": "mutual_tls"}
    for _ in range(20):  # reviews-v3, the caller of ratings looked at below, gets 50 % of pages
        page(mesh)
        s = sidecar_stats(mesh)
        if count(s["ratings-v1-1"], source_workload="reviews-v3", **mtls) > 0:
            break
    details = s["details-v1-1"]
    assert count(details, source_workload="productpage-v1", source_app="productpage",
                 source_version="v1",
                 source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                 **mtls) > 0  # fmt: skip
    # every request details saw came from productpage over mutual TLS
    assert count(details, reporter="destination") == count(
        details, source_workload="productpage-v1", **mtls
    )
    assert count(s["ratings-v1-1"], source_workload="reviews-v3", **mtls) > 0
    assert count(s["productpage-v1-1"], reporter="destination",
                 source_workload="istio-ingressgateway") > 0  # fmt: skip


def jason_pages_with_ratings_abort(
    mesh: MeshThread, n: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Istio's abort task: n pages as jason (reviews v2, ratings answers 500); stats before/after."""
    mesh.apply_file(NET / "virtual-service-reviews-test-v2.yaml")
    mesh.apply_file(NET / "virtual-service-ratings-test-abort.yaml")
    mesh.wait_synced()
    try:
        before = sidecar_stats(mesh)
        req = urllib.request.Request(mesh.gateway_url + "/productpage")
        req.add_header("Cookie", "session=jason")
        for _ in range(n):
            with _opener.open(req, timeout=10) as r:
                body = r.read().decode()
                assert r.status == 200 and "Ratings service is currently unavailable" in body
        return before, sidecar_stats(mesh)
    finally:
        mesh.delete_text((NET / "virtual-service-ratings-test-abort.yaml").read_text())
        mesh.apply_file(NET / "virtual-service-reviews-50-v3.yaml")
        mesh.wait_synced()


def test_fault_aborts_are_counted_by_the_caller_only(mesh: MeshThread) -> None:
    """Injected 500s (flag FI) are reported by the caller's sidecar; ratings never sees them."""
    before, after = jason_pages_with_ratings_abort(mesh, 5)

    def delta(name: str, **labels: str) -> float:
        return count(after[name], **labels) - count(before[name], **labels)

    fi = {"response_code": "500", "response_flags": "FI"}
    assert delta("reviews-v2-1", reporter="source", **fi) == 5
    assert delta("reviews-v2-1", reporter="source") == 5
    assert delta("reviews-v2-1", reporter="destination", response_code="200") == 5
    assert delta("ratings-v1-1") == 0


def test_fault_aborts_name_the_destination_service(mesh: MeshThread) -> None:
    before, after = jason_pages_with_ratings_abort(mesh, 2)
    fi = {"reporter": "source", "response_code": "500", "response_flags": "FI"}
    ratings = SVC.format("ratings")
    got = count(after["reviews-v2-1"], destination_service=ratings, **fi) - count(
        before["reviews-v2-1"], destination_service=ratings, **fi
    )
    assert got == 2


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
)
def test_real_prometheus_counts_reviews_requests(mesh: MeshThread, tmp_path: Path) -> None:
    """The task's PromQL on a real Prometheus scraping every sidecar with diktyo's config."""
    workloads = mesh.describe()["workloads"]
    targets = [Target(f"127.0.0.1:{w['admin_port']}", {"workload": w["name"]}) for w in workloads]
    s = sidecar_stats(mesh)
    expected = sum(count(s[n], reporter="destination") for n in s if n.startswith("reviews-"))
    for _ in range(5):
        page(mesh)
    expected += 5
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(scrape_config(targets, scrape_interval="1s"))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    assert PROMETHEUS is not None
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            query = (
                'sum(istio_requests_total{reporter="destination",destination_service=~"reviews.*"})'
            )
            url = f"http://127.0.0.1:{port}/api/v1/query?query={quote(query)}"
            seen: dict[str, Any] = {"value": None, "ups": {}}

            def counted() -> bool:
                assert proc.poll() is None, log_path.read_text()[-2000:]  # died: fail at once
                status, body = get(url, timeout=2)
                result = json.loads(body)["data"]["result"] if status == 200 else []
                if result:
                    seen["value"] = float(result[0]["value"][1])
                return seen["value"] == expected

            eventually_sync(
                counted,
                timeout=30,
                interval=0.5,
                ignore=(OSError,),  # not listening yet
                what=lambda: f"Prometheus: {seen['value']}, sent {expected}\n"
                + log_path.read_text()[-1500:],
            )
            # every sidecar and the gateway is an up target (first scrapes are spread over 1 s)
            want = {w["name"]: "1" for w in workloads}

            def all_up() -> bool:
                status, body = get(f"http://127.0.0.1:{port}/api/v1/query?query=up", timeout=5)
                result = json.loads(body)["data"]["result"] if status == 200 else []
                seen["ups"] = {r["metric"]["workload"]: r["value"][1] for r in result}
                return seen["ups"] == want

            eventually_sync(
                all_up, timeout=10, interval=0.3, what=lambda: f"up == {want}: {seen['ups']}"
            )
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def find_trace(mesh: MeshThread, want: set[str], since_ns: int) -> list[dict[str, Any]]:
    """Spans of the newest trace started after ``since_ns`` whose services include ``want``."""
    seen = [""]

    def complete() -> list[dict[str, Any]] | None:
        status, body = admin_get(mesh, mesh.url + "/telemetry/api/traces?limit=20")
        assert status == 200, body
        seen[0] = body
        for t in json.loads(body)["traces"]:
            if t["startNs"] >= since_ns and want <= set(t["services"]):
                status, body = admin_get(mesh, mesh.url + "/telemetry/api/traces/" + t["traceId"])
                assert status == 200
                seen[0] = body
                spans: list[dict[str, Any]] = json.loads(body)["spans"]
                if len(spans) == 8:  # every span exported (they arrive in batches)
                    return spans
        return None

    return eventually_sync(
        complete,
        timeout=10,
        interval=0.3,
        what=lambda: f"a complete trace through {want}: {seen[0][:500]}",
    )


def test_one_page_gives_one_trace_with_correct_parents(mesh: MeshThread) -> None:
    mesh.apply_file(NET / "virtual-service-reviews-v3.yaml")  # reviews v3 calls ratings
    mesh.wait_synced()
    since = time.time_ns()
    page(mesh)
    spans = find_trace(
        mesh,
        {"istio-ingressgateway.istio-system", "productpage-v1.default", "reviews-v3.default",
         "ratings-v1.default", "details-v1.default"},
        since,
    )  # fmt: skip
    by_id = {s["spanId"]: s for s in spans}
    assert len(by_id) == 8 and len({s["traceId"] for s in spans}) == 1

    def one(service: str, kind: str, target: str) -> dict[str, Any]:
        found = [s for s in spans if s["service"] == service and s["kind"] == kind
                 and s["name"].startswith(SVC.format(target) + ":9080")]  # fmt: skip
        assert len(found) == 1, (service, kind, target, spans)
        return found[0]

    gw = one("istio-ingressgateway.istio-system", "client", "productpage")
    pp_in = one("productpage-v1.default", "server", "productpage")
    pp_details = one("productpage-v1.default", "client", "details")
    details_in = one("details-v1.default", "server", "details")
    pp_reviews = one("productpage-v1.default", "client", "reviews")
    reviews_in = one("reviews-v3.default", "server", "reviews")
    reviews_ratings = one("reviews-v3.default", "client", "ratings")
    ratings_in = one("ratings-v1.default", "server", "ratings")
    assert gw["parentId"] is None  # the root: the request came without trace headers
    # the caller sidecar's client span is the parent of the callee sidecar's server span; the
    # app copies the trace headers, so its outgoing client spans hang under its server span
    for child, parent in (
        (pp_in, gw), (pp_details, pp_in), (details_in, pp_details), (pp_reviews, pp_in),
        (reviews_in, pp_reviews), (reviews_ratings, reviews_in), (ratings_in, reviews_ratings),
    ):  # fmt: skip
        assert child["parentId"] == parent["spanId"], (child, parent)
        assert (
            parent["startNs"] <= child["startNs"] and child["endNs"] <= parent["endNs"] + 2_000_000
        )
    assert all(s["status"] == "ok" for s in spans)
    assert gw["attributes"]["http.status_code"] == "200"  # Envoy's tags are strings
    gw_authority = mesh.gateway_url.split("://", 1)[1].rstrip("/")
    assert gw["attributes"]["http.url"] == f"http://{gw_authority}/productpage"
    assert gw["attributes"]["component"] == "proxy"
    assert reviews_in["attributes"]["istio.canonical_service"] == "reviews"
    assert reviews_in["attributes"]["istio.canonical_revision"] == "v3"
    assert reviews_in["attributes"]["istio.namespace"] == "default"


def test_a_bare_b3_not_sampled_decision_is_honoured(mesh: MeshThread) -> None:
    since = time.time_ns()
    status, _ = get_with(mesh.gateway_url + "/productpage", {"x-b3-sampled": "0"})
    assert status == 200
    marker = time.time_ns()
    page(mesh)  # traced: 100 % sampling
    find_trace_after(mesh, marker)
    time.sleep(0.5)  # real time: an idle period: an unsampled trace would have arrived by now
    status, body = admin_get(mesh, mesh.url + "/telemetry/api/traces?limit=50")
    started = [t for t in json.loads(body)["traces"] if since <= t["startNs"] < marker]
    assert started == [], started


def get_with(url: str, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers)
    with _opener.open(req, timeout=10) as r:
        return r.status, r.read().decode()


def find_trace_after(mesh: MeshThread, since_ns: int) -> None:
    seen = [""]

    def started() -> bool:
        _status, body = admin_get(mesh, mesh.url + "/telemetry/api/traces?limit=20")
        seen[0] = body
        return any(t["startNs"] >= since_ns for t in json.loads(body)["traces"])

    eventually_sync(
        started, timeout=10, interval=0.2, what=lambda: f"a trace after the marker: {seen[0][:300]}"
    )

"""A local mesh (``diktyo up``) whose client sidecar runs two workers: the workload's
``proxy.istio.io/config: '{"concurrency": 2}'`` annotation starts them, both get the workload
certificate (mTLS to httpbin's sidecar), and Istio's circuit-breaking DestinationRule holds
for the sidecar as a whole (503 UO overflows, never two connections to httpbin at once)."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.load import LoadOptions, LoadResult, run_load
from diktyo.platform.harness import MeshThread
from diktyo.platform.mesh import load_mesh

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "circuit-breaking"
URL = "http://httpbin:8000/get"
CLUSTER = "outbound|8000||httpbin.default.svc.cluster.local"

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def admin(mesh: MeshThread, workload: str, path: str) -> str:
    rep = next(w for w in mesh.describe()["workloads"] if w["workload"] == workload)
    with _opener.open(f"http://127.0.0.1:{rep['admin_port']}{path}", timeout=10) as r:
        body: bytes = r.read()
        return body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line.split("} ", 1)[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_via(mesh: MeshThread, connections: int, requests: int) -> LoadResult:
    rep = next(w for w in mesh.describe()["workloads"] if w["workload"] == "sleep")
    env = {"HTTP_PROXY": f"http://127.0.0.1:{rep['outbound_port']}"}
    options = LoadOptions(url=URL, connections=connections, requests=requests, timeout=5.0)
    return asyncio.run(run_load(options, env=env))


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    spec = load_mesh(SAMPLE / "mesh.yaml")
    for wl in spec.workloads:
        if wl.name == "sleep":
            wl.annotations["proxy.istio.io/config"] = '{"concurrency": 2}'
    with MeshThread(spec) as m:
        m.apply_file(SAMPLE / "destination-rule-httpbin-cb.yaml")
        m.wait_synced()
        yield m


def workers(mesh: MeshThread, workload: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(admin(mesh, workload, "/workers"))["workers"]
    return found


def test_annotation_gives_the_sleep_sidecar_two_workers(mesh: MeshThread) -> None:
    sleep = workers(mesh, "sleep")
    assert len(sleep) == 2 and all(w["alive"] for w in sleep), sleep
    assert sleep[0]["version"] == sleep[1]["version"] != ""  # both serve the synced snapshot
    assert len(workers(mesh, "httpbin")) == 1  # no annotation: the default


def test_circuit_breaking_task_with_two_workers_and_mtls(mesh: MeshThread) -> None:
    before = admin(mesh, "sleep", "/stats/prometheus")
    served_before = sample(admin(mesh, "httpbin", "/stats/prometheus"), "istio_requests_total",
                           reporter="destination", response_code="200",
                           connection_security_policy="mutual_tls")  # fmt: skip
    result = load_via(mesh, connections=3, requests=30)
    assert result.errors == {}, result.errors
    assert set(result.codes) <= {200, 503} and sum(result.codes.values()) == 30, result.codes
    rejected = result.codes.get(503, 0)
    assert rejected >= 1 and result.codes.get(200, 0) >= 1, result.codes
    after = admin(mesh, "sleep", "/stats/prometheus")
    overflow = "envoy_cluster_upstream_rq_pending_overflow"
    grew = sample(after, overflow, cluster_name=CLUSTER) - sample(before, overflow,
                                                                  cluster_name=CLUSTER)
    assert grew == rejected, (grew, rejected)
    uo = sample(after, "istio_requests_total", reporter="source", response_flags="UO") - sample(
        before, "istio_requests_total", reporter="source", response_flags="UO")
    assert uo == rejected, (uo, rejected)
    # 16 more connections at once: reuseport spreads them over both workers (the task's 3
    # connections may all hash to one)
    before_burst = [w["downstream_rq_total"] for w in workers(mesh, "sleep")]
    burst = load_via(mesh, connections=16, requests=32)
    assert burst.errors == {} and set(burst.codes) <= {200, 503}, (burst.codes, burst.errors)
    grew_each = [w["downstream_rq_total"] - b
                 for w, b in zip(workers(mesh, "sleep"), before_burst, strict=True)]  # fmt: skip
    assert all(n > 0 for n in grew_each), grew_each
    # every 200 reached httpbin over mTLS, whichever worker sent it: a worker without the
    # workload certificate would have sent plaintext (counted as "none" by httpbin)
    served = sample(admin(mesh, "httpbin", "/stats/prometheus"), "istio_requests_total",
                    reporter="destination", response_code="200",
                    connection_security_policy="mutual_tls") - served_before  # fmt: skip
    ok = result.codes.get(200, 0) + burst.codes.get(200, 0)
    assert served == ok, (served, result.codes, burst.codes)

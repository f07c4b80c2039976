"""The Telemetry API on the local Bookinfo mesh (docs/tasks.md "Telemetry API"): the mesh file
turns access logs on and samples every request; Telemetry resources turn the access log off for
productpage, filter reviews' log to errors, and stop new traces mesh-wide."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.testing import eventually_sync
from diktyo.testing.controlplane import admin_headers

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo"
TEL = BOOKINFO / "telemetry"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ACCESS = re.compile(
    r'^\[(?P<who>[a-z0-9-]+) sidecar\] \[[0-9T:.-]+Z\] "(?P<method>\w+) (?P<path>\S+)'
)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _opener.open(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(BOOKINFO / "mesh.yaml", gateway_host_port=0) as m:
        m.apply_file(BOOKINFO / "networking" / "bookinfo-gateway.yaml")
        m.wait_synced()
        yield m


def access_lines(mesh: MeshThread, start: int) -> list[tuple[str, str]]:
    """(sidecar, path) of the access log lines written after output offset ``start``."""
    out = []
    for line in mesh.output()[start:].splitlines():
        m = ACCESS.match(line)
        if m:
            out.append((m.group("who"), m.group("path")))
    return out


def pages(mesh: MeshThread, n: int) -> None:
    for _ in range(n):
        status, body = get(mesh.gateway_url + "/productpage")
        assert status == 200, body[:300]


def wait_for(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    eventually_sync(cond, timeout=timeout, interval=0.1)


def settled(mesh: MeshThread, quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until the mesh's output stopped growing for ``quiet`` seconds: sidecars write access
    log lines through a buffer, so a line of an earlier request can arrive late."""
    deadline = time.monotonic() + timeout
    size, since = len(mesh.output()), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the mesh's output never settled"
        time.sleep(0.1)  # real time: the output must stay quiet this long
        now = len(mesh.output())
        if now != size:
            size, since = now, time.monotonic()


def test_access_log_off_for_productpage_and_errors_only_for_reviews(mesh: MeshThread) -> None:
    start = len(mesh.output())
    pages(mesh, 2)
    wait_for(lambda: sum(w == "productpage-v1-1" for w, _ in access_lines(mesh, start)) >= 2)
    settled(mesh)  # no line of these two pages can land in the window measured below
    mesh.apply_file(TEL / "access-log-off-productpage.yaml")
    mesh.apply_file(TEL / "reviews-errors-only.yaml")
    mesh.wait_synced()
    start = len(mesh.output())
    pages(mesh, 3)
    # the lines the mesh default still writes have arrived, then nothing more came for a while
    # (a productpage or reviews line, written through a buffer, would have arrived by then)
    wait_for(lambda: {"details-v1-1", "istio-ingressgateway"} <= access_workloads(mesh, start))
    settled(mesh)
    who = access_workloads(mesh, start)
    assert "productpage-v1-1" not in who  # the workload Telemetry turned it off
    assert not any(w.startswith("reviews") for w in who)  # every reviews call was a 200
    assert {"details-v1-1", "istio-ingressgateway"} <= who  # the mesh default still holds
    mesh.delete_text((TEL / "access-log-off-productpage.yaml").read_text())
    mesh.delete_text((TEL / "reviews-errors-only.yaml").read_text())
    mesh.wait_synced()


def access_workloads(mesh: MeshThread, start: int) -> set[str]:
    return {w for w, _ in access_lines(mesh, start)}


def traces_since(mesh: MeshThread, since_ns: int) -> list[dict]:  # type: ignore[type-arg]
    status, body = get(mesh.url + "/telemetry/api/traces?limit=50", admin_headers(mesh))
    assert status == 200, body
    return [t for t in json.loads(body)["traces"] if t["startNs"] >= since_ns]


def test_mesh_wide_sampling_zero_starts_no_trace(mesh: MeshThread) -> None:
    since = time.time_ns()
    pages(mesh, 1)
    wait_for(lambda: traces_since(mesh, since))  # the mesh file samples 100 %
    mesh.apply_file(TEL / "mesh-no-sampling.yaml")
    mesh.wait_synced()
    since = time.time_ns()
    pages(mesh, 3)
    time.sleep(2.5)  # real time: an idle period: sidecars flush spans every second
    assert traces_since(mesh, since) == []
    # a request that arrives with a sampled trace context is still traced end to end
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, _ = get(
        mesh.gateway_url + "/productpage",
        {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert status == 200
    wait_for(lambda: any(t["traceId"] == trace_id for t in traces_since(mesh, since)))
    mesh.delete_text((TEL / "mesh-no-sampling.yaml").read_text())
    mesh.wait_synced()

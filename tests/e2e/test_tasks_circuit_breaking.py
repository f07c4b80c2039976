"""Istio's circuit breaking task on a local mesh: httpbin behind a tight connection pool.

``samples/circuit-breaking/mesh.yaml`` runs httpbin and a ``sleep`` client (each with a
sidecar; sleep's with Istio's default of 2 workers); the task's DestinationRule allows one
connection, one queued request and one request per connection. A fortio-like load from inside
``sleep`` (``diktyo load --via sleep``) with two or three concurrent connections trips the
breaker: some requests get 503 with flag ``UO``, and the share of 200s is compared with the one
Istio's task shows (85 % and 36.7 %), within a stated tolerance.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.load import LoadOptions, LoadResult, run_load
from diktyo.platform.harness import MeshThread
from diktyo.platform.state import write_state

HERE = Path(__file__).resolve().parents[2] / "samples" / "circuit-breaking"
URL = "http://httpbin:8000/get"
CLUSTER = "outbound|8000||httpbin.default.svc.cluster.local"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def replica(mesh: MeshThread, workload: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == workload)


def load_via(mesh: MeshThread, workload: str, connections: int, requests: int) -> LoadResult:
    """Like ``diktyo load --via WORKLOAD``: the load goes through that workload's sidecar."""
    env = {"HTTP_PROXY": f"http://127.0.0.1:{replica(mesh, workload)['outbound_port']}"}
    options = LoadOptions(url=URL, connections=connections, requests=requests, timeout=5.0)
    return asyncio.run(run_load(options, env=env))


def stats(mesh: MeshThread, workload: str) -> str:
    url = f"http://127.0.0.1:{replica(mesh, workload)['admin_port']}/stats/prometheus"
    with _opener.open(url, timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line.split("} ", 1)[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(HERE / "mesh.yaml") as m:
        m.apply_file(HERE / "destination-rule-httpbin-cb.yaml")
        m.wait_synced()
        yield m


def test_one_connection_never_trips_the_breaker(mesh: MeshThread) -> None:
    result = load_via(mesh, "sleep", connections=1, requests=20)
    assert result.codes == {200: 20}, (result.codes, result.errors)


# Istio's circuit-breaking task (fortio 1.3.1 through the client's sidecar, Envoy with Istio's
# default 2 workers, the same DestinationRule; istio.io content/en/docs/tasks/traffic-management/
# circuit-breaking): "-c 2 -n 20" gives 17 of 20 (85 %) 200, "-c 3 -n 30" 11 of 30 (36.7 %) 200 -
# its 63.3 % at -c 3 is the share of 503s. (The page's 2018 version, fortio 0.6.2, showed 19/20 and
# 19/30 200.) Those are one run's figures; 20 or 30 requests put about 8-9 points of binomial
# noise on a share, so diktyo must land within 20 points (over 2 standard deviations) of each.
ISTIO_SHARE_200 = {2: 17 / 20, 3: 11 / 30}
TOLERANCE = 0.20


def test_overflows_fail_fast_with_uo_and_never_reach_httpbin(mesh: MeshThread) -> None:
    before = stats(mesh, "sleep")
    two = load_via(mesh, "sleep", connections=2, requests=20)
    three = load_via(mesh, "sleep", connections=3, requests=30)
    for result, n in ((two, 20), (three, 30)):
        assert result.errors == {}, result.errors
        assert set(result.codes) <= {200, 503} and sum(result.codes.values()) == n, result.codes
    assert three.codes.get(503, 0) >= 1, three.codes  # three in flight always overflow
    after = stats(mesh, "sleep")
    overflow = "envoy_cluster_upstream_rq_pending_overflow"
    grew = sample(after, overflow, cluster_name=CLUSTER) - sample(
        before, overflow, cluster_name=CLUSTER
    )
    rejected = two.codes.get(503, 0) + three.codes.get(503, 0)
    assert grew == rejected, (grew, rejected)
    uo = sample(
        after,
        "istio_requests_total",
        reporter="source",
        destination_service="httpbin.default.svc.cluster.local",
        response_code="503",
        response_flags="UO",
    ) - sample(before, "istio_requests_total", reporter="source", response_flags="UO")
    assert uo == rejected, (uo, rejected)
    # the 503s never reached httpbin: its sidecar counts only the 200s
    served = sample(
        stats(mesh, "httpbin"),
        "istio_requests_total",
        reporter="destination",
        response_code="503",
    )
    assert served == 0


def within(share: float, c: int) -> bool:
    return abs(share - ISTIO_SHARE_200[c]) <= TOLERANCE + 1e-9  # 5 of 30 is 20 points off 11/30


def test_three_connections_give_istios_figure(mesh: MeshThread) -> None:
    # three runs of Istio's command, their mean compared: one run of 30 swings by +-9 points
    runs = [load_via(mesh, "sleep", connections=3, requests=30) for _ in range(3)]
    share = sum(r.codes.get(200, 0) for r in runs) / 90
    assert within(share, 3), (
        f"-c 3: {share:.0%} of requests got 200, Istio's task shows {ISTIO_SHARE_200[3]:.0%}",
        [r.codes for r in runs],
    )


@pytest.mark.xfail(
    strict=False,
    reason="known gap (docs/tasks.md, Circuit breaking, 'Two regimes'): the breaker and pools "
    "follow Envoy, but a request is pending while its new mTLS connection is set up, 1.2 ms "
    "median in this mesh (0.7 ms between idle processes) against ~1 ms for the request itself; "
    "Istio's 85 % needs a handshake near a tenth of the request, as Envoy's is. Measured: -c 2 "
    "35-60 % 200 (Istio 85 %); with plaintext connections (0.2 ms) 91 %",
)
def test_two_connections_give_istios_figure(mesh: MeshThread) -> None:
    two = load_via(mesh, "sleep", connections=2, requests=20)
    share = two.codes.get(200, 0) / 20
    assert within(share, 2), (
        f"-c 2: {share:.0%} of requests got 200, Istio's task shows {ISTIO_SHARE_200[2]:.0%}",
        two.codes,
    )


def test_the_cli_load_via_sleep(mesh: MeshThread, tmp_path: Path) -> None:
    """``diktyo load --via sleep`` finds the mesh through its state file (``diktyo up``)."""
    write_state(mesh.describe(), tmp_path / "mesh.json")
    env = {**os.environ, "DIKTYO_HOME": str(tmp_path)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "diktyo.cli.main",
            "load",
            "--via",
            "sleep",
            "-c",
            "2",
            "-n",
            "20",
            URL,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Code 200" in res.stdout and "Code 503" in res.stdout, res.stdout


def test_envoy_text_stats_show_pending_overflow(mesh: MeshThread) -> None:
    load_via(mesh, "sleep", connections=3, requests=30)
    url = f"http://127.0.0.1:{replica(mesh, 'sleep')['admin_port']}/stats"
    try:
        with _opener.open(url, timeout=10) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:
        pytest.fail(f"GET /stats answered {exc.code}")
    m = re.search(
        rf"^cluster\.{re.escape(CLUSTER)}\.upstream_rq_pending_overflow: (\d+)$", text, re.MULTILINE
    )
    assert m and int(m.group(1)) > 0, text[:500]

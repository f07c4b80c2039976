"""Istio's mirroring task on a local mesh: all httpbin traffic to v1, a shadow copy to v2.

``samples/mirroring/mesh.yaml`` runs httpbin v1 and v2 behind one service and a ``sleep``
client. With ``httpbin-mirror-v2.yaml`` every request still gets its answer from v1, and v2
receives a copy (Host ``httpbin-shadow:8000``) whose answer is dropped.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from diktyo.load import LoadOptions, LoadResult, run_load
from diktyo.platform.harness import MeshThread
from diktyo.testing import eventually_sync

HERE = Path(__file__).resolve().parents[2] / "samples" / "mirroring"
URL = "http://httpbin:8000/headers"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def replica(mesh: MeshThread, workload: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == workload)


def load_via_sleep(mesh: MeshThread, requests: int) -> LoadResult:
    env = {"HTTP_PROXY": f"http://127.0.0.1:{replica(mesh, 'sleep')['outbound_port']}"}
    options = LoadOptions(url=URL, connections=1, requests=requests, timeout=5.0)
    return asyncio.run(run_load(options, env=env))


def served(mesh: MeshThread, workload: str) -> float:
    """Requests the workload's sidecar answered as destination (``istio_requests_total``)."""
    url = f"http://127.0.0.1:{replica(mesh, workload)['admin_port']}/stats/prometheus"
    with _opener.open(url, timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("istio_requests_total{") and 'reporter="destination"' in line
    )


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    with MeshThread(HERE / "mesh.yaml") as m:
        assert m.mesh is not None
        cp = m.mesh.cp

        def access_logs_on() -> None:  # meshConfig.accessLogFile: /dev/stdout
            log = msgspec.structs.replace(cp.mesh.access_log, enabled=True, path="/dev/stdout")
            cp.mesh = msgspec.structs.replace(cp.mesh, access_log=log)
            cp.kick()

        m.run(access_logs_on)
        m.apply_file(HERE / "httpbin-all-v1.yaml")
        m.wait_synced()
        yield m


def test_mirroring_sends_a_copy_to_v2(mesh: MeshThread) -> None:
    result = load_via_sleep(mesh, 10)
    assert result.codes == {200: 10}, (result.codes, result.errors)
    assert served(mesh, "httpbin-v1") == 10
    assert served(mesh, "httpbin-v2") == 0

    mesh.apply_file(HERE / "httpbin-mirror-v2.yaml")
    mesh.wait_synced()
    result = load_via_sleep(mesh, 10)
    assert result.codes == {200: 10}, (result.codes, result.errors)
    assert served(mesh, "httpbin-v1") == 20  # answers still come from v1 only
    eventually_sync(  # mirrored copies are fire and forget
        lambda: served(mesh, "httpbin-v2") >= 10,
        timeout=15,
        interval=0.2,
        what=lambda: f"10 mirrored copies at v2 (served {served(mesh, 'httpbin-v2')})",
    )
    assert served(mesh, "httpbin-v2") == 10
    # v2 saw the shadow Host (its sidecar's access log: "%REQ(:AUTHORITY)%")
    def v2_lines() -> list[str]:
        return [
            line
            for line in mesh.output().splitlines()
            if re.match(r"\[httpbin-v2-1[^\]]*\]", line) and "GET /headers" in line
        ]

    # the app's own lines match too and come first; the sidecar's access log lines
    # (written through a buffer) carry the shadow Host: wait for those
    eventually_sync(
        lambda: len([line for line in v2_lines() if '"httpbin-shadow:8000"' in line]) >= 10,
        timeout=10,
        interval=0.2,
        what=lambda: "10 access log lines with the shadow Host: "
        + ("\n".join(v2_lines()[-5:]) or mesh.output()[-2000:]),
    )

"""The shared Bookinfo mesh of the e2e modules that run Istio's routing tasks.

``bookinfo_mesh`` boots one whole Bookinfo mesh (control plane, 6 apps, 6 sidecars, the ingress
gateway) per pytest session with the tasks' baseline config: ``bookinfo-gateway.yaml``,
``destination-rule-all.yaml`` and ``virtual-service-all-v1.yaml``. The modules that use it
reset that baseline before and after each test (their function-scoped ``mesh`` fixture), so no
test depends on another's config or traffic (counters are read as deltas). Under xdist these
modules form one group (``bookinfo`` in tests/conftest.py), so one worker boots the mesh once.
Modules that need another base config, kill processes or change mesh-wide settings keep their
own mesh. See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from diktyo.platform.harness import MeshThread
from diktyo.platform.state import pid_alive

BOOKINFO = Path(__file__).resolve().parents[2] / "samples" / "bookinfo"
NET = BOOKINFO / "networking"
BASELINE = ("bookinfo-gateway.yaml", "destination-rule-all.yaml", "virtual-service-all-v1.yaml")


@pytest.fixture(scope="session")
def bookinfo_mesh() -> Iterator[MeshThread]:
    with MeshThread(BOOKINFO / "mesh.yaml", gateway_host_port=0) as mesh:
        for name in BASELINE:
            mesh.apply_file(NET / name)
        mesh.wait_synced()
        pids = mesh.pids()
        yield mesh
    assert len(pids) == 13  # 6 apps + 6 sidecars + 1 gateway
    assert [p for p in pids if pid_alive(p)] == []


def _baseline(mesh: MeshThread) -> None:
    for name in BASELINE:
        mesh.apply_file(NET / name)
    mesh.wait_synced()


@pytest.fixture
def bookinfo_baseline(bookinfo_mesh: MeshThread) -> Iterator[MeshThread]:
    """The shared mesh on its baseline config (every route to v1, the gateway bound), put back
    after the test whatever it applied or deleted."""
    _baseline(bookinfo_mesh)
    yield bookinfo_mesh
    _baseline(bookinfo_mesh)

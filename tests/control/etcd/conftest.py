"""Fixtures: a real etcd (Debian's etcd-server) on loopback, control-plane replicas on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diktyo.control.etcd.backend import EtcdBackend
from diktyo.control.server import ControlPlane
from diktyo.testing.etcd import EtcdCluster, etcd_available

needs_etcd = pytest.mark.skipif(
    not etcd_available(), reason="etcd is not installed (Debian package etcd-server)"
)


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A one-member etcd cluster (fresh per test)."""
    if not etcd_available():
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    (tmp_path / "etcd").mkdir()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def replicas(etcd1: EtcdCluster, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await replicas(n, **ControlPlane kwargs)`` -> started replicas sharing ``etcd1``."""
    started: list[ControlPlane] = []

    async def make(n: int = 2, **kwargs: Any) -> list[ControlPlane]:
        out = []
        lease_ttl = kwargs.pop("lease_ttl", 2)
        for _ in range(n):
            i = len(started)
            backend = EtcdBackend(
                etcd1.client_urls,
                key_file=tmp_path / "store.key",
                replica_id=f"r{i}",
                lease_ttl=lease_ttl,
            )
            cp = ControlPlane(
                observability=False,
                debounce=0.01,
                backend=backend,
                admin_token="test-admin",
                **kwargs,
            )
            await cp.start()
            started.append(cp)
            out.append(cp)
        return out

    try:
        yield make
    finally:
        for cp in started:
            await cp.stop()

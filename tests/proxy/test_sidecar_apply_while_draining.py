"""A snapshot that arrives while the sidecar drains (shutting down) is refused with that reason,
not with an OS error from the listener sockets the drain closed."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from diktyo.snapshot.codec import SnapshotError
from diktyo.testing import FakeUpstream, http_snapshot, start_sidecar


async def test_snapshot_during_drain_is_refused_as_draining() -> None:
    async with FakeUpstream() as app, start_sidecar(
        http_snapshot({"reviews": [("127.0.0.1", app.port)]}, version="1")
    ) as sc:
        sidecar = sc.sidecar
        drain = asyncio.ensure_future(sidecar.drain(timeout=5.0))
        await asyncio.sleep(0)  # real time: one loop turn, the drain has closed the listeners
        assert sidecar.draining
        newer = msgspec.structs.replace(sidecar.rt.snapshot, version="2")
        with pytest.raises(SnapshotError, match="draining"):
            sidecar.apply(newer)
        assert sidecar.rt.snapshot.version == "1"
        await drain

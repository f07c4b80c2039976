"""Run a sidecar for tests: in-process (``start_sidecar``) or as a subprocess (``start_sidecar_process``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from diktyo.snapshot.codec import encode
from diktyo.snapshot.model import Snapshot


@dataclass
class SidecarHandle:
    admin: int
    listeners: dict[str, int]
    sidecar: Any = None  # the in-process Sidecar (None for a subprocess)
    process: Any = None  # asyncio.subprocess.Process for a subprocess
    extra: dict[str, Any] = field(default_factory=dict)

    def port(self, name: str | None = None) -> int:
        """Port of listener ``name`` (default: the first outbound-looking one)."""
        if name is not None:
            return self.listeners[name]
        for n, p in self.listeners.items():
            if "outbound" in n:
                return p
        return next(iter(self.listeners.values()))


@contextlib.asynccontextmanager
async def start_sidecar(snapshot: Snapshot, seed: int | None = 1) -> AsyncIterator[SidecarHandle]:
    """Run a sidecar on the current event loop; yields its ports; stops it afterwards."""
    from diktyo.proxy.admin import AdminServer
    from diktyo.proxy.sidecar import Sidecar

    loop = asyncio.get_running_loop()
    sc = Sidecar(loop, seed=seed)
    sc.apply(snapshot)
    admin = AdminServer(sc)
    await admin.start()
    await sc.wait_listening()
    try:
        yield SidecarHandle(admin.port, sc.ports(), sidecar=sc)
    finally:
        admin.close()
        await sc.stop()


@contextlib.asynccontextmanager
async def start_sidecar_process(
    snapshot: Snapshot, *extra_args: str, timeout: float = 20.0
) -> AsyncIterator[SidecarHandle]:
    """Run ``python -m diktyo.cli.main sidecar --snapshot F`` and read its ready line."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(encode(snapshot))
        path = f.name
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "diktyo.cli.main",
        "sidecar",
        "--snapshot",
        path,
        *extra_args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            err = await proc.stderr.read() if proc.stderr else b""
            raise RuntimeError(f"sidecar exited before ready: {err.decode(errors='replace')}")
        ready = json.loads(line)
        yield SidecarHandle(ready["admin"], ready["listeners"], process=proc, extra=ready)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        os.unlink(path)

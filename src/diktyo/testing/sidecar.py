"""Run a sidecar for tests: in-process (``start_sidecar``) or as a subprocess (``start_sidecar_process``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
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
        # extra["admin_token"]: the bearer token for POST /drain and other mutating endpoints
        yield SidecarHandle(admin.port, sc.ports(), sidecar=sc, extra={"admin_token": admin.token})
    finally:
        admin.close()
        await sc.stop()


@contextlib.asynccontextmanager
async def start_sidecar_process(
    snapshot: Snapshot, *extra_args: str, timeout: float = 20.0
) -> AsyncIterator[SidecarHandle]:
    """Run ``python -m diktyo.cli.main sidecar --snapshot F`` and read its ready line.

    Unless ``--admin-token-file`` is among ``extra_args``, the admin token goes to a temporary
    0600 file; ``handle.extra["admin_token"]`` holds the token either way."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(encode(snapshot))
        path = f.name
    token_dir = None
    if "--admin-token-file" not in extra_args:
        token_dir = tempfile.mkdtemp(prefix="diktyo-admin-")
        extra_args = (*extra_args, "--admin-token-file", os.path.join(token_dir, "token"))
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
        token_file = ready.get("admin_token_file")
        if token_file and os.path.exists(token_file):
            ready["admin_token"] = Path(token_file).read_text().strip()
        yield SidecarHandle(ready["admin"], ready["listeners"], process=proc, extra=ready)
    finally:
        # communicate() reads the pipes to EOF while waiting: a wait() alone can hang on a
        # child that filled a pipe nobody reads (asyncio reports the exit once pipes close)
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.communicate(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.communicate(), 5)
        os.unlink(path)
        if token_dir is not None:
            shutil.rmtree(token_dir, ignore_errors=True)

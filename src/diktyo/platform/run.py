"""Running a local mesh from the CLI: foreground supervisor with signals, and the detached form."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from diktyo.platform.mesh import MeshSpec
from diktyo.platform.state import log_path, read_state, running_state, state_path, write_state
from diktyo.platform.supervisor import LocalMesh, MeshStartError
from diktyo.security import admin_token

AfterStart = Callable[[LocalMesh], Awaitable[None]]


def already_running_message() -> str | None:
    state = running_state()
    if state is None:
        return None
    return (
        f"a mesh is already running (supervisor pid {state.get('pid')}, control plane "
        f"{state.get('control_plane')}); stop it with 'diktyo down' first"
    )


async def serve_mesh(
    spec: MeshSpec,
    *,
    config_dir: str | Path | None = None,
    after_start: AfterStart | None = None,
    write_state_file: bool = True,
) -> int:
    """Start the mesh, run until SIGINT/SIGTERM, stop in order. Returns the exit code."""
    mesh: LocalMesh

    def save() -> None:
        if write_state_file:
            with contextlib.suppress(OSError):
                write_state(mesh.describe())

    # the admin credential the CLI and dashboard use ($DIKTYO_HOME/admin-token, 0600)
    token = admin_token.ensure() if write_state_file else None
    mesh = LocalMesh(spec, config_dir=config_dir, on_change=save, admin_token=token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        start = loop.create_task(mesh.start())
        stopper = loop.create_task(stop.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            stopper.cancel()
            start.result()  # raises MeshStartError
            print_ready(mesh)
            if after_start is not None:
                await after_start(mesh)
            await stop.wait()
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, MeshStartError):
                await start
        print("stopping: apps, then sidecars, then the control plane ...", flush=True)
    except MeshStartError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await mesh.stop()
        if write_state_file:
            state = read_state()
            if state is not None and state.get("pid") == os.getpid():
                with contextlib.suppress(OSError):
                    state_path().unlink()
        print("mesh stopped", flush=True)
    return code


def print_ready(mesh: LocalMesh) -> None:
    d = mesh.describe()
    lines = [
        f"mesh {d['name']!r} ready",
        f"  control plane: {d['control_plane']}",
        f"  dashboard:     {d['dashboard']}?token={mesh.cp.admin_token}",
    ]
    if d["gateway"]:
        lines.append(f"  ingress:       {d['gateway']}")
    lines.append("  stop with Ctrl-C or 'diktyo down'")
    print("\n".join(lines), flush=True)


def run_detached(argv: list[str], timeout: float = 120.0) -> int:
    """Start ``diktyo ARGV`` as a background supervisor; return once its mesh is ready."""
    log = log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diktyo.cli.main", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        return _wait_detached(proc, log, timeout)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)  # interrupted while starting: stop the mesh too
        print("interrupted; stopping the mesh", file=sys.stderr)
        return 130


def _wait_detached(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            print(
                f"error: the mesh did not start (exit code {code}); full log: {log}",
                file=sys.stderr,
            )
            return 1
        state = read_state()
        if state and state.get("pid") == proc.pid and state.get("state") == "ready":
            print(f"mesh {state.get('name')!r} ready (supervisor pid {proc.pid}, log {log})")
            print(f"  control plane: {state.get('control_plane')}")
            print(f"  dashboard:     {state.get('dashboard')}?token={admin_token.read() or ''}")
            if state.get("gateway"):
                print(f"  ingress:       {state.get('gateway')}")
            print("  'diktyo status' lists workloads; 'diktyo down' stops the mesh")
            return 0
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    print(f"error: the mesh was not ready within {timeout:g}s; see {log}", file=sys.stderr)
    return 1


def stop_running(timeout: float = 60.0) -> int:
    state = running_state()
    if state is None:
        print("no mesh is running")
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    print(f"stopping mesh {state.get('name')!r} (supervisor pid {pid}) ...", flush=True)
    deadline = time.monotonic() + timeout
    from diktyo.platform.state import pid_alive

    while time.monotonic() < deadline:
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                if state_path().exists() and (read_state() or {}).get("pid") == pid:
                    state_path().unlink()
            print("mesh stopped")
            return 0
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    print(
        f"error: supervisor pid {pid} still running after {timeout:g}s; kill it with 'kill {pid}'",
        file=sys.stderr,
    )
    return 1

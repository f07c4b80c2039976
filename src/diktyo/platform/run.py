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
from typing import Any

from diktyo.platform.mesh import MeshSpec
from diktyo.platform.state import (
    home,
    live_children,
    log_path,
    orphaned_hint,
    pid_alive,
    read_state,
    running_state,
    state_path,
    write_state,
)
from diktyo.platform.supervisor import LocalMesh, MeshStartError
from diktyo.security import admin_token

AfterStart = Callable[[LocalMesh], Awaitable[None]]


def already_running_message() -> str | None:
    state = running_state()
    if state is None:
        return None
    if state.get("state") == "orphaned":
        return orphaned_hint(state)
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
    mesh_file: str | Path | None = None,
    adopt: dict[str, Any] | None = None,
) -> int:
    """Start the mesh (or ``adopt`` the orphaned one of that state file), run until
    SIGINT/SIGTERM, stop in order. Returns the exit code.

    With the state file (``diktyo up``/``demo``) the mesh outlives a killed supervisor: its
    children run without a parent-death signal and log to ``$DIKTYO_HOME/logs``."""
    mesh: LocalMesh
    from diktyo.platform.keeper import KEEPER_ENV

    keeper = os.environ.pop(KEEPER_ENV, None)  # not passed on to sidecars and apps

    def save() -> None:
        if write_state_file:
            with contextlib.suppress(OSError):
                write_state({**mesh.describe(), "keeper_pid": int(keeper) if keeper else None})

    # the admin credential the CLI and dashboard use ($DIKTYO_HOME/admin-token, 0600)
    token = admin_token.ensure() if write_state_file else None
    mesh = LocalMesh(
        spec,
        config_dir=config_dir,
        on_change=save,
        home=home() if write_state_file else None,
        mesh_file=mesh_file,
        admin_token=token,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        start = loop.create_task(mesh.adopt(adopt) if adopt is not None else mesh.start())
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
        # a second Ctrl-C/SIGTERM (e.g. from both 'diktyo down' and the keeper) must not kill
        # the supervisor halfway through stopping the mesh in order
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: None)
        await mesh.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
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
            # the keeper runs 'diktyo ARGV' and starts it again (adopting the mesh) if killed
            [sys.executable, "-m", "diktyo.platform.keeper", *argv],
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
        if state and state.get("keeper_pid") == proc.pid and state.get("state") == "ready":
            print(
                f"mesh {state.get('name')!r} ready (supervisor pid {state.get('pid')}, "
                f"keeper pid {proc.pid}, log {log})"
            )
            print(f"  control plane: {state.get('control_plane')}")
            print(f"  dashboard:     {state.get('dashboard')}?token={admin_token.read() or ''}")
            if state.get("gateway"):
                print(f"  ingress:       {state.get('gateway')}")
            if state.get("capture"):
                net = f", network {state['network']}" if state.get("network") else ""
                print(f"  capture:       {state['capture']}{net}")
            print("  'diktyo status' lists workloads; 'diktyo down' stops the mesh")
            return 0
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    print(f"error: the mesh was not ready within {timeout:g}s; see {log}", file=sys.stderr)
    return 1


def stop_running(timeout: float = 60.0) -> int:
    """Stop the mesh: SIGTERM to its keeper and supervisor (which stops apps, sidecars and the
    control plane in order); then whatever of the state file still runs (an orphaned mesh, or
    a supervisor that died while stopping) is stopped from the state file."""
    from diktyo.platform.process import is_running

    state = running_state()
    if state is None:
        print("no mesh is running")
        return 0
    pid = int(state["pid"])
    keeper = int(state.get("keeper_pid") or 0)
    if keeper and is_running(keeper):
        with contextlib.suppress(ProcessLookupError):
            os.kill(keeper, signal.SIGTERM)  # no new supervisor from here on
    if state.get("state") == "orphaned":
        _wait_gone([keeper], 10.0)
        return stop_orphaned(state)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    print(f"stopping mesh {state.get('name')!r} (supervisor pid {pid}) ...", flush=True)
    if not _wait_gone([pid, keeper], timeout):
        print(
            f"error: supervisor pid {pid} still running after {timeout:g}s; kill it with "
            f"'kill {pid}'",
            file=sys.stderr,
        )
        return 1
    if any(live_children(state).values()):
        return stop_orphaned(state)
    with contextlib.suppress(OSError):
        if state_path().exists() and (read_state() or {}).get("pid") == pid:
            state_path().unlink()
    print("mesh stopped")
    return 0


def _wait_gone(pids: list[int], timeout: float) -> bool:
    from diktyo.platform.process import is_running

    deadline = time.monotonic() + timeout
    while any(p and is_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        for p in pids:
            if p:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p, os.WNOHANG)
        time.sleep(0.1)
    return True


def remove_network(state: dict[str, Any]) -> None:
    """Transparent mode: the namespaces, links and hosts files a dead supervisor left."""
    prefixes = state.get("network_prefixes")
    if state.get("capture") != "transparent" or not prefixes:
        return
    from diktyo.platform.capture_netns import Netns

    removed = Netns(prefix=prefixes[0], link_prefix=prefixes[1]).remove_all()
    if any(removed.values()):
        print(
            "removed the mesh's network: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in removed.items() if v)
        )


def stop_orphaned(state: dict[str, Any], grace: float = 5.0) -> int:
    """Stop a mesh whose supervisor died, from its state file: apps, then sidecars."""
    from diktyo.platform.process import stop_pids

    live = live_children(state)
    print(
        f"the supervisor of mesh {state.get('name')!r} (pid {state.get('pid')}) is gone; "
        f"stopping its {len(live['app'])} apps, then its {len(live['sidecar'])} sidecars ...",
        flush=True,
    )
    killed = stop_pids([live["app"], live["sidecar"]], grace=grace)
    if killed:
        print(f"killed (did not stop in {grace:g}s after SIGTERM): {killed}")
    left = [p for ps in live_children(state).values() for p in ps]
    if left:
        print(f"error: still running: {left}; kill them with 'kill -9 PID'", file=sys.stderr)
        return 1
    remove_network(state)
    with contextlib.suppress(OSError):
        current = read_state() or {}
        if current.get("pid") == state.get("pid") or not pid_alive(int(current.get("pid") or 0)):
            state_path().unlink()
    print("mesh stopped")
    return 0

"""The state file of a running local mesh (``$DIKTYO_HOME/mesh.json``, default ``~/.diktyo``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def home() -> Path:
    return Path(os.environ.get("DIKTYO_HOME") or Path.home() / ".diktyo")


def state_path() -> Path:
    return home() / "mesh.json"


def log_path() -> Path:
    return home() / "mesh.log"


def write_state(state: dict[str, Any], path: Path | None = None) -> None:
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def read_state(path: Path | None = None) -> dict[str, Any] | None:
    path = path or state_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (dead, waiting for its parent to reap it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")
    except (OSError, ValueError):
        return True


def live_children(state: dict[str, Any]) -> dict[str, list[int]]:
    """The state file's apps and sidecars that still run as those very processes (pid and
    start time match: a pid reused by another process is not counted)."""
    from diktyo.platform.process import same_process

    out: dict[str, list[int]] = {"app": [], "sidecar": []}
    for w in state.get("workloads", []):
        if not isinstance(w, dict):
            continue
        for c, pids in out.items():
            pid, start = w.get(f"{c}_pid"), w.get(f"{c}_start_time")
            if pid and same_process(int(pid), start):
                pids.append(int(pid))
    return out


def running_state() -> dict[str, Any] | None:
    """The state of a running mesh, or None (a stale file of a dead supervisor is removed).

    A mesh whose supervisor died while its sidecars and apps still run is returned with
    ``state: "orphaned"``: its data plane serves, its control plane is gone until
    ``diktyo up -f FILE`` adopts it (or ``diktyo down`` stops it).
    """
    state = read_state()
    if state is None:
        return None
    if not pid_alive(int(state.get("pid", 0) or 0)):
        if any(live_children(state).values()):
            return {**state, "state": "orphaned", "supervisor_alive": False}
        try:
            state_path().unlink()
        except OSError:
            pass
        return None
    return state


def orphaned_hint(state: dict[str, Any]) -> str:
    up = f"'diktyo up -f {state['mesh_file']}'" if state.get("mesh_file") else "'diktyo up -f FILE'"
    return (
        f"the supervisor of mesh {state.get('name')!r} (pid {state.get('pid')}), which ran its "
        "control plane, is gone; its sidecars and apps keep serving with their last config. "
        f"{up} adopts the mesh (the control plane comes back on the same port), "
        "'diktyo down' stops it"
    )


def control_plane_url(explicit: str | None = None) -> str:
    """The control plane URL: ``--control-plane``, ``$DIKTYO_CONTROL_PLANE`` or the running mesh."""
    if explicit:
        return explicit.rstrip("/")
    env = os.environ.get("DIKTYO_CONTROL_PLANE")
    if env:
        return env.rstrip("/")
    state = running_state()
    if state and state.get("state") == "orphaned":
        raise LookupError(orphaned_hint(state))
    if state and state.get("control_plane"):
        return str(state["control_plane"]).rstrip("/")
    raise LookupError(
        "no control plane found: start a mesh with 'diktyo up -f mesh.yaml --detach' (or "
        "'diktyo demo'), or pass --control-plane URL / set DIKTYO_CONTROL_PLANE"
    )

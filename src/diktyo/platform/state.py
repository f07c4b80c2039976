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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_state() -> dict[str, Any] | None:
    """The state of a running mesh, or None (a stale file of a dead supervisor is removed)."""
    state = read_state()
    if state is None:
        return None
    if not pid_alive(int(state.get("pid", 0) or 0)):
        try:
            state_path().unlink()
        except OSError:
            pass
        return None
    return state


def control_plane_url(explicit: str | None = None) -> str:
    """The control plane URL: ``--control-plane``, ``$DIKTYO_CONTROL_PLANE`` or the running mesh."""
    if explicit:
        return explicit.rstrip("/")
    env = os.environ.get("DIKTYO_CONTROL_PLANE")
    if env:
        return env.rstrip("/")
    state = running_state()
    if state and state.get("control_plane"):
        return str(state["control_plane"]).rstrip("/")
    raise LookupError(
        "no control plane found: start a mesh with 'diktyo up -f mesh.yaml --detach' (or "
        "'diktyo demo'), or pass --control-plane URL / set DIKTYO_CONTROL_PLANE"
    )

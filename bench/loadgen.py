"""Load generators: wrk (closed loop, saturation) and pacer (open loop at a fixed rate,
``bench/pacer.c`` compiled on first use), both pinned to the load core."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from procs import LOAD_CORE, pinned

HERE = Path(__file__).resolve().parent
LUA = HERE / "report.lua"


class LoadError(RuntimeError):
    """The load generator failed; the message says how."""


def wrk(port: int, path: str, connections: int, seconds: float) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(
        pinned(LOAD_CORE, argv), capture_output=True, text=True, check=False, timeout=seconds + 60
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            res: dict[str, Any] = json.loads(line[8:])
            dur = res["duration_us"] / 1e6
            res["rps"] = res["requests"] / dur if dur else 0.0
            res["seconds"] = dur
            res["error_count"] = sum(res["errors"].values())
            return res
    raise LoadError(
        f"wrk gave no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}"
    )


def build_pacer(build_dir: Path) -> Path | None:
    """Compile bench/pacer.c (needs gcc); None when no C compiler is available."""
    exe = build_dir / "pacer"
    src = HERE / "pacer.c"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def pacer(
    exe: Path, port: int, path: str, rate: int, seconds: float, connections: int
) -> dict[str, Any]:
    argv = [str(exe), "127.0.0.1", str(port), path, str(rate), str(seconds), str(connections)]
    out = subprocess.run(
        pinned(LOAD_CORE, argv),
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds * 3 + 30,
    )
    if out.returncode != 0:
        raise LoadError(f"pacer failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    res: dict[str, Any] = json.loads(out.stdout)
    res["rps"] = res["achieved_rps"]
    res["seconds"] = res["requests"] / res["achieved_rps"] if res["achieved_rps"] else 0.0
    res["error_count"] = res["errors"]
    return res

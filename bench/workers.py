#!/usr/bin/env python3
"""Worker processes (``--concurrency``): scaling and balance, in one run on this machine.

    python bench/workers.py              # 1 vs 2 workers, alternated, 3 repetitions
    python bench/workers.py --balance    # downstream connections per worker: reuseport vs shared

Both sidecars may run on cores 0-1 (``taskset -c 0-1``), so the only difference is the worker
count; nginx answers a fixed 200 as the upstream, ``wrk -c50 -t2`` is the load. Prints rps,
CPU per request (the sidecar's process tree, utime+stime) and the proxy's CPU use. The machine
is shared: quote the ratio within a repetition and the load average printed at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs

NGINX = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok"; }} }} }}
"""


def _sidecar(snapshot: Path, workers: int, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    argv = ["taskset", "-c", "0-1", sys.executable, "-m", "diktyo.proxy", "--snapshot",
            str(snapshot), "--concurrency", str(workers)]  # fmt: skip
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert p.stdout is not None
    ready: dict[str, object] = json.loads(p.stdout.readline())
    return p, ready


def _wrk(port: int, seconds: float, connections: int = 50) -> int:
    out = subprocess.run(
        ["wrk", f"-c{connections}", "-t2", f"-d{seconds:g}s", "-H", "Host: svc",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(next(ln for ln in out.splitlines() if "requests in" in ln).split()[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--balance", action="store_true", help="connections per worker, both socket modes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    from diktyo.snapshot.codec import encode
    from diktyo.testing.snapshots import http_snapshot

    tmp = Path(tempfile.mkdtemp(prefix="diktyo-workers-bench-"))
    port = procs.free_port()
    (tmp / "nginx.conf").write_text(NGINX.format(tmp=tmp, port=port))
    up = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                           "-e", str(tmp / "nginx.err")])  # fmt: skip
    snap = tmp / "snapshot.json"
    snap.write_bytes(encode(http_snapshot({"svc": [("127.0.0.1", port)]})))
    print("load average at start:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        time.sleep(0.3)
        for rep in range(args.reps):
            cells = [("reuseport", 2), ("shared", 2)] if args.balance else [("reuseport", 1),
                                                                            ("reuseport", 2)]
            for mode, workers in cells:
                env = dict(os.environ, DIKTYO_WORKER_SOCKETS=mode)
                p, ready = _sidecar(snap, workers, env)
                try:
                    lport = int(ready["listeners"]["outbound"])  # type: ignore[index]
                    _wrk(lport, 1.0, 10)  # warm up
                    pids = procs.tree(p.pid)
                    c0, t0 = procs.cpu_seconds(pids), time.monotonic()
                    n = _wrk(lport, args.seconds)
                    cpu, wall = procs.cpu_seconds(pids) - c0, time.monotonic() - t0
                    line = (f"rep {rep + 1} workers {workers} ({mode}): {n / wall:8.0f} rps "
                            f"{cpu / n * 1e6:6.1f} us CPU/req  proxy CPU {cpu / wall * 100:4.0f}%")
                    if args.balance:
                        url = f"http://127.0.0.1:{ready['admin']}/workers"
                        ws = json.loads(opener.open(url, timeout=10).read())["workers"]
                        line += "  connections per worker " + "/".join(
                            str(w["downstream_cx_total"]) for w in ws)
                    print(line, flush=True)
                finally:
                    p.terminate()
                    p.wait()
    finally:
        up.terminate()
        up.wait()
    print("load average at end:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""cProfile of one HTTP/2 sidecar under ``h2load -c10 -m10`` (h2c upstream nginx on core 1):
where the CPU of a proxied HTTP/2 request goes, and how many calls of each function one
request costs (``ncalls / requests``).

    .venv/bin/python bench/micro/h2_profile.py [--seconds 5] [--pure] [--top 40]

``--pure`` runs the sources (``DIKTYO_PURE=1``) so that compiled modules show their functions.
The profile slows the sidecar ~2x: read the shares and the calls per request, not the time.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import h2bench as hb  # noqa: E402
import procs  # noqa: E402

RUN = """
import cProfile, signal, sys
from diktyo.cli.main import main
prof = cProfile.Profile()
out = sys.argv[-1]
def dump(*a):
    prof.disable()
    prof.dump_stats(out + ".tmp")
    import os; os.rename(out + ".tmp", out)
signal.signal(signal.SIGUSR1, dump)
prof.enable()
try:
    main(sys.argv[1:-1])
finally:
    prof.disable()
    prof.dump_stats(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--codec", default="nghttp2")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-h2prof-"))
    up = procs.free_port()
    (tmp / "up.conf").write_text(hb.upstream_conf(tmp, up))
    upstream = hb.spawn("upstream", ["nginx", "-c", str(tmp / "up.conf")], up, tmp / "up.log",
                        procs.LOAD_CORE)  # fmt: skip
    snap = tmp / "s.json"
    snap.write_text(json.dumps(hb.diktyo_snapshot(0, up)))
    out = tmp / "prof.out"
    saved = dict(os.environ)
    os.environ["DIKTYO_HTTP2_CODEC"] = a.codec
    if a.pure:
        os.environ["DIKTYO_PURE"] = "1"
    try:
        argv = [sys.executable, "-c", RUN, "sidecar", "--snapshot", str(snap), "--admin-port",
                "0", str(out)]  # fmt: skip
        p = procs.start_sidecar("profiled", argv, tmp / "sc.log", procs.PROXY_CORE)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        hb.wait_h2(p.port)
        load = ["h2load", f"-D{a.seconds:g}", "-c10", "-m10", "-t1", f"http://127.0.0.1:{p.port}/"]
        res = subprocess.run(procs.pinned(procs.LOAD_CORE, load), capture_output=True, text=True,
                             check=False)  # fmt: skip
        m = re.search(r"(\d+) succeeded", res.stdout)
        ok = int(m.group(1)) if m else 0
        os.kill(p.popen.pid, 10)
        import time
        for _ in range(100):
            if out.exists():
                break
            time.sleep(0.1)
    finally:
        p.stop()
        upstream.stop()
    print(f"{ok} requests; profile {out}")
    st = pstats.Stats(str(out))
    total = st.total_tt
    print(f"profiled time {total:.2f}s = {total / max(ok, 1) * 1e6:.1f} us/request (inflated)")
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{Path(file).name}:{line}({fn})"))
    rows.sort(reverse=True)
    by_file: dict[str, float] = {}
    for tt, _ct, _nc, name in rows:
        key = name.split(":")[0] if not name.startswith("~") else "builtins"
        by_file[key] = by_file.get(key, 0.0) + tt
    print("self time by file:", ", ".join(
        f"{k} {v / total * 100:.1f}%" for k, v in sorted(by_file.items(), key=lambda x: -x[1])[:14]))
    print(f"{'self%':>6} {'cum%':>6} {'calls/req':>9}  function")
    for tt, ct, nc, name in rows[: a.top]:
        print(f"{tt / total * 100:6.1f} {ct / total * 100:6.1f} {nc / max(ok, 1):9.2f}  {name}")


if __name__ == "__main__":
    main()

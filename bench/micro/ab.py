"""A/B throughput of diktyo sidecar variants against HAProxy in the same run (saturation, wrk -c50).

For tuning the sidecar's hot path one change at a time: each repetition starts HAProxy and every
diktyo variant fresh on core 0 (order rotated), measures each with wrk (``-t1 -c50``, core 1,
same nginx upstream as ``bench/run.py``) and prints rps, the proxy's CPU per request and the
ratio to HAProxy *of the same repetition*; the summary gives medians over repetitions.

    python bench/micro/ab.py --variants base=HEAD,new=wt --reps 3 --seconds 3

A variant is ``name=wt`` (the working tree) or ``name=REV`` (``src/`` exported at git REV and
put first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))

import loadgen
import procs
import targets as tg


def export(rev: str, into: Path) -> Path:
    dest = into / rev.replace("/", "_")
    dest.mkdir()
    data = subprocess.run(
        ["git", "-C", str(BENCH.parent), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True)
    return dest / "src"


def measure(
    port: int, pids: list[int], seconds: float, conns: int, rate: int, pacer: Path | None
) -> dict[str, float]:
    loadgen.wrk(port, "/", conns, 1)  # warm up (pool, caches)
    cpu0 = procs.cpu_seconds(pids)
    sys0 = procs.sys_seconds(pids)
    if rate and pacer is not None:
        res = loadgen.pacer(pacer, port, "/", rate, seconds, conns)
    else:
        res = loadgen.wrk(port, "/", conns, seconds)
    cpu = procs.cpu_seconds(pids) - cpu0
    sy = procs.sys_seconds(pids) - sys0
    n = max(1, res["requests"])
    return {
        "rps": res["rps"],
        "us": cpu * 1e6 / n,
        "sys_us": sy * 1e6 / n,
        "util": cpu / res["seconds"],
        "errors": res["error_count"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", default="wt=wt", help="name=wt|REV,... (default: wt=wt)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument(
        "--rate", type=int, default=0, help="paced requests/s (bench/pacer.c) instead of wrk"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-ab-"))
    pacer = loadgen.build_pacer(tmp / "build") if args.rate else None
    variants: list[tuple[str, str | None]] = []
    for item in args.variants.split(","):
        name, _, rev = item.partition("=")
        variants.append((name, None if rev in ("", "wt") else str(export(rev, tmp))))
    names = ([] if args.no_haproxy else ["haproxy"]) + [n for n, _ in variants]
    srcs = dict(variants)
    base_pp = os.environ.get("PYTHONPATH", "")
    upstream = tg.start_upstream(tmp, procs.LOAD_CORE)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    try:
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            row: dict[str, dict[str, float]] = {}
            for name in order:
                if name == "haproxy":
                    run = tg.start_target("haproxy", tmp, upstream)
                else:
                    src = srcs[name]
                    os.environ["PYTHONPATH"] = (src + os.pathsep + base_pp) if src else base_pp
                    run = tg.start_target("diktyo", tmp, upstream)
                try:
                    time.sleep(0.2)
                    pids = [pid for p in run.procs for pid in p.pids()]
                    row[name] = measure(
                        run.port, pids, args.seconds, args.connections, args.rate, pacer
                    )
                finally:
                    run.stop()
            for name in names:
                r = row[name]
                if "haproxy" in row:
                    r["ratio"] = r["rps"] / row["haproxy"]["rps"]
                results[name].append(r)
                print(
                    f"rep {rep} {name:10s} rps {r['rps']:8.0f}  ratio {r.get('ratio', 0):.3f}  "
                    f"cpu/req {r['us']:6.1f} us (sys {r['sys_us']:5.1f})  util {r['util']:.2f}  "
                    f"err {r['errors']}",
                    flush=True,
                )
        print("median over reps:")
        for name in names:
            rs = results[name]
            med = {
                k: statistics.median(r.get(k, 0) for r in rs)
                for k in ("rps", "ratio", "us", "sys_us", "util")
            }
            spread = [round(r.get("ratio", 0), 3) for r in rs]
            print(
                f"  {name:10s} rps {med['rps']:8.0f}  ratio {med['ratio']:.3f} {spread}  "
                f"cpu/req {med['us']:6.1f} us (sys {med['sys_us']:5.1f})  util {med['util']:.2f}"
            )
    finally:
        upstream.stop()
        os.environ["PYTHONPATH"] = base_pp
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

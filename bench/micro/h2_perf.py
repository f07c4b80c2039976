"""Where an HTTP/2 sidecar's CPU goes per request, with the compiled code's names: ``perf
record --call-graph dwarf`` of one sidecar (compiled build) under ``h2load -c10 -m10`` (h2c nginx
upstream and h2load on core 1), then every sample is charged to the innermost *named* frame of
its stack: a mypyc function (``module___Class___method``), a cffi entry (``_cffi_f_...``), a
libnghttp2 entry point or a uvloop write. So libpython's allocation, dict and attribute work
lands on the compiled function that asked for it, which a flat ``perf report`` by DSO cannot
show ("libpython 56 %"). Also prints read/write syscalls per request (``/proc/PID/io``).

    .venv/bin/python bench/micro/h2_perf.py [--seconds 3] [--top 40]

Needs ``perf`` (Debian ``linux-perf``); run it inside ``flock /work/wt/bench.lock``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import h2bench as hb  # noqa: E402
import procs  # noqa: E402

FRAME = re.compile(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)$")


def owner(frames: list[tuple[str, str]]) -> str:
    """The innermost named frame of one stack (innermost first)."""
    for sym, dso in frames:
        if sym.startswith(("CPyDef_", "CPyPy_")):
            return sym.replace("CPyDef_", "").replace("CPyPy_", "")
        if "kallsyms" in dso:
            continue
        if sym.startswith("_cffi_f_"):
            return sym
        if sym.startswith("nghttp2_") and "libnghttp2" in dso:
            return "libnghttp2:" + sym
        if sym.startswith(("__pyx_f_6uvloop", "__pyx_pw_6uvloop")):
            return "uvloop:" + sym.split("_4loop_")[-1]
        if sym == "_PyEval_EvalFrameDefault":
            return "(interpreted Python)"
    return "(other)"


def io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-h2perf-"))
    up = procs.free_port()
    (tmp / "up.conf").write_text(hb.upstream_conf(tmp, up))
    upstream = hb.spawn("upstream", ["nginx", "-c", str(tmp / "up.conf")], up, tmp / "up.log",
                        procs.LOAD_CORE)  # fmt: skip
    data = tmp / "perf.data"
    try:
        port, ps = hb.start_target("diktyo-nghttp2", tmp, up)
        try:
            pid = ps[0].pids()[-1]
            hb.h2load(port, 1, 10, 10, tmp / "warm.tsv")
            rec = subprocess.Popen(
                ["perf", "record", "-q", "-F", "999", "--call-graph", "dwarf,16384", "-o",
                 str(data), "-p", str(pid), "--", "sleep", f"{a.seconds:g}"],
            )  # fmt: skip
            io0, cpu0 = io(pid), ps[0].cpu()
            res = hb.h2load(port, a.seconds, 10, 10, tmp / "run.tsv")
            io1, cpu1 = io(pid), ps[0].cpu()
            rec.wait()
        finally:
            for p in ps:
                p.stop()
    finally:
        upstream.stop()
    ok = max(res["ok"], 1)
    print(json.dumps({
        "rps": res["rps"], "cpu_us_per_req": round((cpu1 - cpu0) / ok * 1e6, 1),
        "reads_per_req": round((io1["syscr"] - io0["syscr"]) / ok, 3),
        "writes_per_req": round((io1["syscw"] - io0["syscw"]) / ok, 3),
    }))  # fmt: skip
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym,dso"],
                            capture_output=True, text=True, check=False).stdout  # fmt: skip
    by_fn: collections.Counter[str] = collections.Counter()
    n = 0
    for sample in script.split("\n\n"):
        frames = []
        for line in sample.strip().splitlines():
            m = FRAME.match(line.strip())
            if m:
                frames.append((m.group(1).split("+0x")[0], m.group(2)))
        if frames:
            n += 1
            by_fn[owner(frames)] += 1
    by_mod: collections.Counter[str] = collections.Counter()
    for fn, c in by_fn.items():
        by_mod[fn.split(":")[0] if ":" in fn else fn.split("___")[0]] += c
    print(f"{n} samples; by module:", ", ".join(
        f"{k} {v / n * 100:.1f}%" for k, v in by_mod.most_common(12)))  # fmt: skip
    for fn, c in by_fn.most_common(a.top):
        print(f"{c / n * 100:5.1f}%  {fn}")


if __name__ == "__main__":
    main()

"""HTTP/2 sidecar A/B: an older git revision against the working tree, in one run.

One fixed-response h2c nginx upstream (core 1); per repetition each revision's sidecar is
started fresh on core 0 (``PYTHONPATH`` = that revision's ``src``, exported with ``git
archive``) and loaded with ``h2load -c10 -m10`` from core 1; revisions alternate. Prints rps
and CPU per request (utime+stime of the sidecar / requests). The machine is shared: read the
pairs, and prefer CPU per request.

    .venv/bin/python bench/micro/h2_ab.py fc440c9 --codec nghttp2 --reps 2 --seconds 3

``--env VAR=A,B`` compares two values of an environment variable on the working tree instead
(same build, e.g. ``--env DIKTYO_NGHTTP2_CFFI=abi,auto``); ``--haproxy`` adds HAProxy (h2 both
sides) to each repetition, for the ratio of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import h2bench as hb  # noqa: E402
import procs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "old", nargs="?", default="",
        help="git revision to compare with the tree (its pure sources), or a src directory",
    )  # fmt: skip
    ap.add_argument("--env", default="", help="VAR=A,B: the tree with VAR=A against VAR=B")
    ap.add_argument("--haproxy", action="store_true", help="HAProxy in every repetition too")
    ap.add_argument("--codec", default="auto", help="DIKTYO_HTTP2_CODEC for both (auto|nghttp2|h2)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-h2ab-"))
    revs: dict[str, tuple[Path, dict[str, str]]] = {}
    if a.env:
        var, _, values = a.env.partition("=")
        for v in values.split(","):
            revs[f"{var}={v}"] = (ROOT / "src", {var: v})
    elif Path(a.old, "diktyo").is_dir():  # a prepared source tree (built extensions inside)
        revs = {a.old: (Path(a.old), {}), "worktree": (ROOT / "src", {})}
    else:
        old_dir = tmp / "old"
        old_dir.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", a.old, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old_dir)], input=archive, check=True)
        revs = {a.old: (old_dir / "src", {}), "worktree": (ROOT / "src", {})}
    if a.haproxy:
        revs["haproxy"] = (Path(), {})
    up = procs.free_port()
    (tmp / "up.conf").write_text(hb.upstream_conf(tmp, up))
    upstream = hb.spawn("upstream", ["nginx", "-c", str(tmp / "up.conf")], up, tmp / "up.log",
                        procs.LOAD_CORE)  # fmt: skip
    snap = tmp / "s.json"
    snap.write_text(json.dumps(hb.diktyo_snapshot(0, up)))
    run = "import sys; from diktyo.cli.main import main; sys.exit(main())"
    try:
        for rep in range(a.reps):
            for name, (src, env) in revs.items():
                if name == "haproxy":
                    port, ps = hb.start_target("haproxy", tmp, up)
                    p = ps[0]
                else:
                    saved = dict(os.environ)
                    os.environ.update(PYTHONPATH=str(src), DIKTYO_HTTP2_CODEC=a.codec, **env)
                    try:
                        argv = [sys.executable, "-c", run, "sidecar", "--snapshot", str(snap),
                                "--admin-port", "0"]  # fmt: skip
                        p = procs.start_sidecar(name, argv, tmp / "sc.log", procs.PROXY_CORE)
                    finally:
                        os.environ.clear()
                        os.environ.update(saved)
                    hb.wait_h2(p.port)
                c0 = p.cpu()
                load = ["h2load", f"-D{a.seconds:g}", "-c10", "-m10", "-t1",
                        f"http://127.0.0.1:{p.port}/"]  # fmt: skip
                out = subprocess.run(procs.pinned(procs.LOAD_CORE, load), capture_output=True,
                                     text=True, check=False)  # fmt: skip
                c1 = p.cpu()
                p.stop()
                m = re.search(r"(\d+) succeeded", out.stdout)
                ok = int(m.group(1)) if m else 0
                cpu = f"{(c1 - c0) / ok * 1e6:.1f} us/request" if ok else "-"
                print(f"rep {rep} {name:28s} {ok / a.seconds:8.0f} rps  {cpu}", flush=True)
    finally:
        upstream.stop()
    print("load average:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()

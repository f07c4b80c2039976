"""Start the bench's nginx upstream and one diktyo sidecar (working tree), print their ports and
pids, keep them up for ``--seconds`` (for strace / perf / py-spy sessions by hand)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import procs
import targets as tg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--target", default="diktyo", help="diktyo or haproxy")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diktyo-serve-"))
    upstream = tg.start_upstream(tmp, procs.LOAD_CORE)
    run = tg.start_target(args.target, tmp, upstream)
    try:
        print(f"port={run.port} pid={run.procs[0].pid} upstream={upstream.port}", flush=True)
        time.sleep(args.seconds)
    finally:
        run.stop()
        upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

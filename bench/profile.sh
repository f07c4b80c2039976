#!/usr/bin/env bash
# Profile the diktyo sidecar under load: py-spy samples it while wrk saturates it, and writes a
# flame graph (SVG) plus py-spy's raw text profile.
#
#   bench/profile.sh [SECONDS] [TARGET] [CONNECTIONS]
#     SECONDS      how long to sample (default 15)
#     TARGET       diktyo (one sidecar, the bench's realistic config) or mesh-diktyo (profiles
#                  the client sidecar of the two-hop path); default diktyo
#     CONNECTIONS  wrk connections (default 50)
#
# Output: bench/results/profile-<date>.svg (flame graph), .txt (py-spy --format raw: collapsed
# stacks) and -summary.txt (top functions by self and inclusive time, bench/flame_summary.py). Needs py-spy (pip install -e '.[bench]') and root or ptrace permission.
# The sidecar runs on core 0, the upstream nginx and wrk on core 1, as in bench/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_=${1:-15}
TARGET=${2:-diktyo}
CONNS=${3:-50}
PY=${PY:-.venv/bin/python}
PYSPY=${PYSPY:-$(dirname "$PY")/py-spy}
if [ ! -x "$PYSPY" ]; then PYSPY=$(command -v py-spy || true); fi
if [ -z "$PYSPY" ]; then
  echo "profile.sh: py-spy not found: pip install -e '.[bench]' (or pip install py-spy)" >&2
  exit 2
fi
for t in nginx wrk taskset; do
  command -v "$t" >/dev/null || { echo "profile.sh: $t missing: apt-get install -y nginx wrk util-linux" >&2; exit 2; }
done
STAMP=$(date -u +%Y-%m-%d-%H%M)
OUT=bench/results/profile-$STAMP
mkdir -p bench/results
exec "$PY" - "$SECONDS_" "$TARGET" "$CONNS" "$OUT" "$PYSPY" <<'PYEOF'
import subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "bench")
import procs, targets
secs, target, conns, out, pyspy = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
tmp = Path(tempfile.mkdtemp(prefix="diktyo-profile-"))
up = targets.start_upstream(tmp, procs.LOAD_CORE)
run = targets.start_target(target, tmp, up)
pid = run.procs[0].pid
try:
    wrk = subprocess.Popen(procs.pinned(procs.LOAD_CORE, ["wrk", "-t1", f"-c{conns}", f"-d{2 * int(secs) + 4}s",
                           f"http://127.0.0.1:{run.port}/"]), stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    # two samplers one after the other (not together: each slows the sidecar down)
    common = [pyspy, "record", "-p", str(pid), "-d", str(int(secs)), "-r", "100", "--nonblocking"]
    subprocess.run(common + ["-o", out + ".svg"], check=True)
    subprocess.run(common + ["-f", "raw", "-o", out + ".txt"], check=True)
    print(wrk.communicate()[0])
    import flame_summary
    summary = flame_summary.summarise(out + ".txt", 30)
    Path(out + "-summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"profile.sh: flame graph {out}.svg, raw profile {out}.txt, summary {out}-summary.txt "
          f"(pid {pid}, {target})")
finally:
    run.stop(); up.stop()
PYEOF

#!/usr/bin/env bash
# Interleaved in-process A/B: bench/micro/inproc.py --no-profile for each git REV (src/ exported
# and put first on PYTHONPATH), REPS rounds, all on core 0; prints every run's CPU us per
# request and the best (least disturbed by other tenants) per REV. Usage: inproc_ab.sh REPS REV...
# A REV that is a directory holding src/diktyo is used as it is: a scratch clone built with
# `setup.py build_ext --inplace` compares compiled builds (git archive has no .so files).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=$1; shift
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
src_of() { if [ -d "$1/src/diktyo" ]; then echo "$1/src"; else echo "$TMP/$1/src"; fi; }
for rev in "$@"; do
  [ -d "$rev/src/diktyo" ] && continue
  mkdir -p "$TMP/$rev"; git archive "$rev" src | tar -x -C "$TMP/$rev"
done
for i in $(seq "$REPS"); do
  for rev in "$@"; do
    r=$(PYTHONPATH="$(src_of "$rev")" taskset -c 0 .venv/bin/python bench/micro/inproc.py --no-profile --requests 20000 | awk '{print $1}')
    echo "$rev $r"
  done
done | tee "$TMP/out"
echo "best (least CPU us per request; the in-process loop also runs the client and upstream):"
sort -k1,1 -k2,2n "$TMP/out" | awk '!seen[$1]++'

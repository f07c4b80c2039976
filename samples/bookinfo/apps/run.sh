#!/usr/bin/env bash
# Bookinfo without a mesh: every app on 127.0.0.1, wired by *_URL variables (no sidecars).
# Usage: samples/bookinfo/apps/run.sh [reviews-version]   (v1, v2 or v3; default v2)
# Then open http://127.0.0.1:9080/productpage ; Ctrl-C stops everything.
set -euo pipefail
PY=${PYTHON:-python3}
V=${1:-v2}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
PORT=9083 $PY -m diktyo.samples.bookinfo.ratings & pids+=($!)
PORT=9082 SERVICE_VERSION=$V POD_NAME=reviews-$V-1 RATINGS_URL=http://127.0.0.1:9083 \
  $PY -m diktyo.samples.bookinfo.reviews & pids+=($!)
PORT=9081 $PY -m diktyo.samples.bookinfo.details & pids+=($!)
PORT=9080 DETAILS_URL=http://127.0.0.1:9081 REVIEWS_URL=http://127.0.0.1:9082 \
  $PY -m diktyo.samples.bookinfo.productpage & pids+=($!)
wait

#!/usr/bin/env bash
# A load sweep of the server (docs/serving.md, "Measuring load"): for each server, start it, drive it with
# scripts/load_test.py at each client count, and note its resident memory; one JSON file a
# point in OUT (sweep-c<concurrency>-<mode>-<clients>.json). Servers (bfloat16, 2 threads):
#   one     --concurrency 1, mode ar: one engine, requests queue (servers before issue 18)
#   ar      --concurrency 16, mode ar: 16 engines on one model, steps batched
#   ht      --concurrency 16, mode ht: the same, tree steps batched and sized for the pass
#
#   bash scripts/load_sweep.sh [OUT] [CLIENTS] [SERVERS]
#   bash scripts/load_sweep.sh docs/bench/issue18-load "1 2 4 8 16" "one ar ht"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/bench/issue18-load}
CLIENTS=${2:-1 2 4 8 16}
SERVERS=${3:-one ar ht}
PORT=${PORT:-7871}
mkdir -p "$OUT"
for server in $SERVERS; do
  case $server in
    one) concurrency=1 mode=ar tag=c1-ar ;;
    ar) concurrency=16 mode=ar tag=c16-ar ;;
    ht) concurrency=16 mode=ht tag=c16-ht ;;
    *) echo "unknown server $server (one, ar, ht)" >&2; exit 2 ;;
  esac
  .venv/bin/leapfrog serve --port "$PORT" --http-port -1 --threads 2 --dtype bfloat16 --mode "$mode" \
    --concurrency "$concurrency" > "$OUT/server-$server.log" 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 120); do  # until it listens
    grep -q "Ctrl-C stops" "$OUT/server-$server.log" 2>/dev/null && break
    kill -0 $pid 2>/dev/null || { cat "$OUT/server-$server.log" >&2; exit 1; }
    sleep 1
  done
  for n in $CLIENTS; do
    requests=$(( n * 2 > 8 ? n * 2 : 8 ))
    .venv/bin/python scripts/load_test.py --port "$PORT" --clients "$n" --requests "$requests" --max-new-tokens 64 \
      --mode "$mode" --out "$OUT/sweep-$tag-$n.json"
    rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
    echo "  resident memory: $(( rss / 1024 )) MB"
    python3 - "$OUT/sweep-$tag-$n.json" "$rss" <<'PY'
import json, sys
path, rss = sys.argv[1], int(sys.argv[2])
d = json.load(open(path)); d["server_rss_mb"] = round(rss / 1024); json.dump(d, open(path, "w"), indent=1)
PY
  done
  kill $pid; wait $pid 2>/dev/null || true
  trap - EXIT
done

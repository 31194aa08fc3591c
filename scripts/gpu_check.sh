#!/usr/bin/env bash
# The GPU check of issue 14, sized for one call on a lent H200 (under 8 minutes):
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)   # the device tool; results under $OUT
# It measures t(n) for n = 1..128, ar tokens/s (and the tree modes' with a real checkpoint:
# CHECKPOINT=path.gguf, carried over two calls and joined with cat, plus the gguf wheel),
# then runs the model tests (CPU). Commit the JSON and logs under docs/bench/.
set -euo pipefail
OUT=${OUT:-out/gpu_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
timeout 420 python scripts/gpu_check.py --device "$DEVICE" --out "$OUT/gpu_check.json" \
    ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} 2>&1 | tee "$OUT/gpu_check.log"
timeout 90 python -m pytest -q -p no:cacheprovider tests/workers/test_model.py tests/workers/test_tree_step.py \
    2>&1 | tail -5 | tee "$OUT/tests.log" || true

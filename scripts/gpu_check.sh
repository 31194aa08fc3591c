#!/usr/bin/env bash
# The GPU check of issue 14, sized for a lent H200 (each call under 8 minutes):
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)   # the device tool; results under $OUT
# Without CHECKPOINT: t(n) for n = 1..128 and ar tokens/s, CUDA graphs off and on, on random
# weights of SmolLM2-135M's shape (and profile-DTYPE.json, the graphed t(n) for `leapfrog
# sweep --project`), then the model tests on CUDA (the captured graphs against plain
# launches, and the padded steps). With CHECKPOINT (e.g. "default", once the GGUF and the
# gguf wheel have travelled over two calls): the modes' tokens/s, graphs off and on, and
# `pipeline` with 2 workers sharing the GPU (local transport: hit rate, wasted steps), each
# one's tokens against ar's. Commit the JSON and logs under docs/bench/.
set -euo pipefail
OUT=${OUT:-out/gpu_check}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
if [ -z "${CHECKPOINT:-}" ]; then
    timeout 360 "$PYTHON" scripts/gpu_check.py --device "$DEVICE" --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
    timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not real_model" \
        tests/workers/test_graphed_layers.py tests/workers/test_tree_step.py 2>&1 | tail -15 | tee "$OUT/tests.log" || true
else
    timeout 420 "$PYTHON" scripts/gpu_check.py --device "$DEVICE" --skip-curve --checkpoint "$CHECKPOINT" \
        --out "$OUT/gpu_modes.json" 2>&1 | tee "$OUT/gpu_modes.log"
fi

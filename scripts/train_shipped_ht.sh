#!/usr/bin/env bash
# Re-creates the shipped hidden-transfer weights (workers/drafters/weights/smollm2-135m-ht.safetensors,
# docs/ht.md "The shipped weights") from nothing: the original 500 steps on 1,500 self-distilled
# replies, then 500 more steps on 3,000 (the first 1,500 among them) at half the learning rate.
# About 1.5 hours on 2 CPU cores, most of it generating the replies. Each stage caches its data and
# resumes from its checkpoint (--resume) when run again after a stop.
set -euo pipefail
OUT=${1:-out/ht}
COMMON=(--drafter ht --layer 22 --k 4 --dtype bfloat16 --threads 2 --val-examples 60 --batch 4 --positions-per-seq 64 --resume)
leapfrog train "${COMMON[@]}" --examples 1500 --steps 500 --lr 2e-3 --eval-every 125 --log-every 25 \
    --distill-batch 16 --out "$OUT/L22_k4_500.safetensors"
leapfrog train "${COMMON[@]}" --examples 3000 --max-new-tokens 128 --distill-dtype bfloat16 --distill-batch 32 \
    --steps 500 --lr 1e-3 --eval-every 250 --log-every 50 --init "$OUT/L22_k4_500.safetensors" \
    --out "$OUT/L22_k4_500_3000x128_500more.safetensors"
echo "weights: $OUT/L22_k4_500_3000x128_500more.safetensors (copy over workers/drafters/weights/smollm2-135m-ht.safetensors to ship them)"

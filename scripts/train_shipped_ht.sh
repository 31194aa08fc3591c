#!/usr/bin/env bash
# Re-creates the shipped hidden-transfer weights (workers/drafters/weights/smollm2-135m-ht.safetensors,
# docs/ht.md "The shipped weights") from nothing, in four stages:
#   1. 500 steps on 1,500 self-distilled replies of at most 128 tokens (2 CPU cores, ~1 hour);
#   2. 500 more on 3,000 such replies, half the learning rate (2 CPU cores, ~30 minutes);
#   3. 648 steps of 16 packed replies x 128 positions on 9,216 self-distilled replies of at most
#      384 tokens (2.6M reply tokens);
#   4. 331 more on 10,240 of them (2.9M tokens) at half that learning rate;
# and then the successor prior over those replies, weighted for these weights (scripts/build_successor_prior.py, ~2 min).
# Stages 3 and 4 ran on an H200 (a one-off GPU script (git history: scripts/gpu_train.py): 13 minutes with the data made there). On 2 CPU
# cores they take about 12 hours (4.4 hours to generate the replies at ~184 tokens/s, then 27 s a step,
# measured), so run them with DEVICE=cuda where there is a GPU. A CPU packs 4 replies a forward (as
# fast as 1 there, and a pack of 16 would need over 16 GB); a GPU packs all 16. Each stage caches its data and resumes from its checkpoint
# (--resume) when run again after a stop.
set -euo pipefail
OUT=${1:-out/ht}
DEVICE=${DEVICE:-auto}
PACK=$([ "${DEVICE%%:*}" = cuda ] && echo 16 || echo 4)
COMMON=(--drafter ht --layer 22 --k 4 --dtype bfloat16 --threads 2 --val-examples 60 --batch 4 --positions-per-seq 64
        --resume --device "$DEVICE")
BIG=(--max-new-tokens 384 --distill-dtype bfloat16 --distill-batch 1024 --batch 16 --pack "$PACK" --positions-per-seq 128
     --log-every 25)
leapfrog train "${COMMON[@]}" --examples 1500 --steps 500 --lr 2e-3 --eval-every 125 --log-every 25 \
    --distill-batch 16 --out "$OUT/L22_k4_500.safetensors"
leapfrog train "${COMMON[@]}" --examples 3000 --max-new-tokens 128 --distill-dtype bfloat16 --distill-batch 32 \
    --steps 500 --lr 1e-3 --eval-every 250 --log-every 50 --init "$OUT/L22_k4_500.safetensors" \
    --out "$OUT/L22_k4_500_3000x128_500more.safetensors"
leapfrog train "${COMMON[@]}" "${BIG[@]}" --examples 9216 --steps 648 --lr 1e-3 --eval-every 162 \
    --init "$OUT/L22_k4_500_3000x128_500more.safetensors" --out "$OUT/L22_k4_9216x384_648.safetensors"
leapfrog train "${COMMON[@]}" "${BIG[@]}" --examples 10240 --steps 331 --lr 5e-4 --eval-every 82 \
    --init "$OUT/L22_k4_9216x384_648.safetensors" --out "$OUT/L22_k4_10240x384_331more.safetensors"
python scripts/build_successor_prior.py --ht-weights "$OUT/L22_k4_10240x384_331more.safetensors" \
    --out "$OUT/L22_k4_prior.safetensors"
echo "weights: $OUT/L22_k4_10240x384_331more.safetensors and its prior $OUT/L22_k4_prior.safetensors (copy over"
echo "workers/drafters/weights/smollm2-135m-ht.safetensors and smollm2-135m-ht-prior.safetensors to ship them)"

#!/usr/bin/env bash
# Re-creates the shipped EAGLE-peer weights (workers/drafters/weights/smollm2-135m-eagle.safetensors,
# docs/drafters.md "The EAGLE peer"): one draft layer trained on the first 4,096 of the 384-token
# self-distilled replies that the shipped hidden-transfer weights' stages 3 and 4 use (1.16M reply
# tokens; scripts/train_shipped_ht.sh; the data are made here if the cache lacks them, slowly on a CPU).
# On 2 CPU cores: ~32 minutes of target features (cached in OUT/eagle_4096.features, one file per
# 64 replies), then 3,000 steps of 4 replies (~31 minutes), then 1,000 more that also train depth 2 on
# the draft model's own predicted features (--unroll 2, ~18 minutes). Run it again after a stop and it resumes.
set -euo pipefail
OUT=${1:-out/eagle}
DEVICE=${DEVICE:-auto}
leapfrog train --drafter eagle --dtype bfloat16 --threads 2 --device "$DEVICE" --resume \
    --examples 4096 --max-new-tokens 384 --distill-dtype bfloat16 --distill-batch 1024 --val-examples 60 \
    --vocab 8192 --steps 3000 --batch 4 --lr 1e-3 --log-every 100 --eval-every 500 --checkpoint-every 100 \
    --out "$OUT/eagle_4096.safetensors"
mkdir -p "$OUT/eagle_4096_unroll.features"
cp -aln "$OUT/eagle_4096.features/." "$OUT/eagle_4096_unroll.features/"  # the same features, linked
leapfrog train --drafter eagle --dtype bfloat16 --threads 2 --device "$DEVICE" --resume \
    --examples 4096 --max-new-tokens 384 --distill-dtype bfloat16 --distill-batch 1024 --val-examples 60 \
    --steps 1000 --batch 4 --lr 5e-4 --unroll 2 --init "$OUT/eagle_4096.safetensors" \
    --log-every 100 --eval-every 250 --checkpoint-every 100 --out "$OUT/eagle_4096_unroll.safetensors"
echo "weights: $OUT/eagle_4096_unroll.safetensors (copy over workers/drafters/weights/smollm2-135m-eagle.safetensors to ship them)"

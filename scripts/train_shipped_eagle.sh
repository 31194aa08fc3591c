#!/usr/bin/env bash
# Re-creates the shipped EAGLE-peer weights (workers/drafters/weights/smollm2-135m-eagle.safetensors,
# docs/drafters.md "The EAGLE peer"): one draft layer trained from its start on the first 8,192
# ShareGPT training prompts' self-distilled replies (bfloat16 greedy, at most 384 tokens: 2.31M reply
# tokens), 3,866 steps of 32 replies that also train depth 2 on the draft model's own predicted
# features (--unroll 2). The shipped file was made on a lent H200 by a one-off GPU script (git history: scripts/gpu_train.sh) (--drafter
# eagle; 199 s of replies, 20 s of features, 182 s of training). DEVICE=cuda does the same here with
# one command; on 2 CPU cores it takes ~4 hours of replies (cached, shared with scripts/train_shipped_ht.sh)
# and ~9 hours of steps. Run it again after a stop and it resumes (replies, features, checkpoint).
set -euo pipefail
OUT=${1:-out/eagle}
DEVICE=${DEVICE:-auto}
leapfrog train --drafter eagle --dtype bfloat16 --threads 2 --device "$DEVICE" --resume \
    --examples 8192 --max-new-tokens 384 --distill-dtype bfloat16 --distill-batch 1024 --val-examples 60 \
    --vocab 8192 --steps 3866 --batch 32 --lr 1e-3 --unroll 2 --log-every 100 --eval-every 966 \
    --checkpoint-every 100 --out "$OUT/eagle.safetensors"
echo "weights: $OUT/eagle.safetensors (copy over workers/drafters/weights/smollm2-135m-eagle.safetensors to ship them)"

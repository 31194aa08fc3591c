#!/usr/bin/env bash
# Issues 15 and 16 on a lent H200: self-distilled data at scale, drafter training and the
# pipeline check (scripts/gpu_train.py; its docstring has the steps and the options).
# Here first: `python scripts/gpu_train.py prepare` (fills .gpu/, .gpu2/, .gpu3/, git-ignored).
# Then one device call per folder, back to back (the machine stays warm 30 s between them):
#   run(command="bash scripts/gpu_train.sh", carry=[".gpu"], timeout_s=60)     # installs gguf, stashes part 1
#   run(command="bash scripts/gpu_train.sh", carry=[".gpu2"], timeout_s=60)    # stashes part 2
#   run(command="bash scripts/gpu_train.sh [RUN OPTIONS]", carry=[".gpu3"], timeout_s=590)  # joins the GGUF, runs
# and here: `python scripts/gpu_train.py land <files_at>`. Results under $OUT (default out/gpu_train).
# Stop 27's run: --drafter eagle --batch 32 --gen-until 200 --check-until 300 --train-until 520
set -euo pipefail
OUT=${OUT:-out/gpu_train}
STASH=${STASH:-/root/leapfrog-gpu}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$STASH/site:$PWD"
mkdir -p "$OUT" "$STASH"
if [ -d .gpu/whl ] && [ ! -d "$STASH/site/gguf" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" .gpu/whl/*.whl
fi
for carried in .gpu .gpu[0-9]*; do                              # what this call (and any before it) carried
    [ -d "$carried" ] && find "$carried" -maxdepth 1 -type f -exec cp {} "$STASH/" \;
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
timeout 580 "$PYTHON" scripts/gpu_train.py run --stash "$STASH" --out "$OUT" "$@"

#!/usr/bin/env bash
# Issue 15 on a lent H200: self-distilled data at scale and ht training (scripts/gpu_train.py).
# Here first: `python scripts/gpu_train.py prepare` (fills .gpu/ and .gpu2/, both git-ignored).
# Then two device calls back to back (the machine stays warm 30 s between them):
#   run(command="bash scripts/gpu_train.sh", carry=[".gpu"], timeout_s=90)    # installs gguf, stashes part 1
#   run(command="bash scripts/gpu_train.sh", carry=[".gpu2"], timeout_s=560)  # joins the GGUF, generates, trains
# and here: `python scripts/gpu_train.py land <files_at>`. Results under $OUT (default out/gpu_train).
set -euo pipefail
OUT=${OUT:-out/gpu_train}
STASH=${STASH:-/root/leapfrog-gpu}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$STASH/site:$PWD"
mkdir -p "$OUT" "$STASH"
if [ -f .gpu/gguf.part1 ] && [ ! -f .gpu2/gguf.part2 ]; then   # the first call
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" .gpu/whl/*.whl
    cp .gpu/gguf.part1 .gpu/prompts.json.gz "$STASH/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
    "$PYTHON" -c "import gguf, torch, transformers; print('gguf', gguf.__version__ if hasattr(gguf, '__version__') else 'ok', 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.is_available())"
    echo "part 1 stashed in $STASH"
else                                                            # the second call
    [ -d "$STASH/site/gguf" ] || [ ! -d .gpu/whl ] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STASH/site" .gpu/whl/*.whl
    timeout 550 "$PYTHON" scripts/gpu_train.py run --stash "$STASH" --out "$OUT" "$@"
fi

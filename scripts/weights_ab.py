"""Two or more sets of hidden-transfer weights side by side in one run (the data-scale ablation).

One engine per [ht] weights file, the same model and settings otherwise, compared by
runtime.bench.engines_ab. Prints tokens/s relative to `ar`, tokens per step and the
identical-to-`ar` count, and writes JSON.

    python scripts/weights_ab.py --weights workers/drafters/weights/smollm2-135m-ht.safetensors,out/ht/big.safetensors \
        --modes ht,ht-alone --per-category 1 --dtype bfloat16 --threads 2 --out docs/bench/issue15-data-scale.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from configs.schema import DrafterConfigs, HiddenTransferModeConfig, ModelConfig
from runtime.bench.engines_ab import compare_engines
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="comma-separated [ht] weights files")
    p.add_argument("--modes", default="ht,ht-alone")
    p.add_argument("--prompts", default=str(default_prompts_path()), help="Spec-Bench-format JSONL")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    engines = {w: Engine(ModelConfig(dtype=args.dtype, device="cpu"), DrafterConfigs(ht=HiddenTransferModeConfig(weights=w)))
               for w in args.weights.split(",")}
    prompts = load_prompts(args.prompts, per_category=args.per_category)
    rows = compare_engines(engines, args.modes.split(","), prompts, args.max_new_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                                          "prompts": args.prompts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

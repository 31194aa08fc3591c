"""The `ht` drafts with and without the conditional head, side by side in one run.

Two engines on the same weights, one with [ht] head = the file given (or the shipped one),
one with head = "off" (the successor prior alone), compared by runtime.bench.engines_ab:
tokens/s relative to each engine's `ar`, tokens per step, identical replies.

    python scripts/head_ab.py --modes ht --per-category 2 --dtype bfloat16 --threads 2 \
        --out docs/bench/issue15-head-bf16.json
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
    p.add_argument("--head", default="default", help="the head under test: default (shipped) or a .safetensors path")
    p.add_argument("--modes", default="ht")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    engines = {f"head {how}": Engine(ModelConfig(dtype=args.dtype, device="cpu"), DrafterConfigs(ht=HiddenTransferModeConfig(head=how)))
               for how in (args.head, "off")}
    prompts = load_prompts(default_prompts_path(), per_category=args.per_category)
    rows = compare_engines(engines, args.modes.split(","), prompts, args.max_new_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                                          "head": args.head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Trees sized by the device's cost against the fixed budgets, side by side in one run.

Two engines on the same weights, one with [tree_sizing] cost = "auto" (this device's t(n))
and one with cost = "off" (the fixed budgets of the config defaults), compared by
runtime.bench.engines_ab. Prints tokens/s relative to `ar` and tokens per step, and writes JSON.

    python scripts/sizing_ab.py --modes ht,ht-pld,pld,token-recycling,medusa --per-category 1 \
        --dtype bfloat16 --threads 2 --out docs/bench/issue15-sizing-bf16.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from configs.schema import DrafterConfigs, ModelConfig, TreeSizingConfig
from runtime.bench.engines_ab import compare_engines
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="ht,ht-pld,pld,token-recycling")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    engines = {how: Engine(ModelConfig(dtype=args.dtype, device="cpu"), DrafterConfigs(tree_sizing=TreeSizingConfig(cost=how)))
               for how in ("auto", "off")}
    prompts = load_prompts(default_prompts_path(), per_category=args.per_category)
    rows = compare_engines(engines, args.modes.split(","), prompts, args.max_new_tokens)
    for row in rows:
        row["sizing"] = row.pop("engine")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                                          "cost_curve_ms": {c: dict(zip(s.rows, s.ms))
                                                            for c, s in engines["auto"].cost_curve().by_context.items()},
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

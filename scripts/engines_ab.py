"""One setting on and off, side by side in one run (runtime.bench.engines_ab): two
engines on the same weights, each mode's tokens/s relative to its engine's `ar`, tokens
per step and identical replies, written as JSON.

    --setting sizing   [tree_sizing] cost = "auto" (this device's t(n)) against "off" (the fixed budgets)
    --setting weights  [ht] weights = each of --weights A,B (default B: the shipped weights)

    python scripts/engines_ab.py --setting sizing --modes ht,ht-pld,pld,token-recycling,medusa \
        --per-category 1 --dtype bfloat16 --threads 1 --out docs/history/bench/issue15-sizing-bf16-t1.json
    python scripts/engines_ab.py --setting weights --weights out/ht/mine.safetensors \
        --modes ht,ht-alone --per-category 2 --out out/weights-ab.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from configs.schema import DrafterConfigs, HiddenTransferModeConfig, ModelConfig, TreeSizingConfig
from runtime.bench.engines_ab import compare_engines
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine


def drafter_configs(setting: str, weights: str) -> dict[str, DrafterConfigs]:
    """The two engines' drafter settings, by the name each row carries."""
    if setting == "sizing":
        return {how: DrafterConfigs(tree_sizing=TreeSizingConfig(cost=how)) for how in ("auto", "off")}
    files = weights.split(",") if "," in weights else [weights, "default"]
    if len(files) != 2:
        raise SystemExit(f"--weights takes one or two files, got {weights!r}")
    return {f"weights {w}": DrafterConfigs(ht=HiddenTransferModeConfig(weights=w)) for w in files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=("sizing", "weights"), required=True)
    p.add_argument("--weights", default="default", help="with --setting weights: A or A,B (.safetensors paths or default)")
    p.add_argument("--modes", default="ht")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    engines = {name: Engine(ModelConfig(dtype=args.dtype, device="cpu"), drafters)
               for name, drafters in drafter_configs(args.setting, args.weights).items()}
    prompts = load_prompts(default_prompts_path(), per_category=args.per_category)
    rows = compare_engines(engines, args.modes.split(","), prompts, args.max_new_tokens)
    report = {"setting": args.setting, "dtype": args.dtype, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
              "rows": rows}
    if args.setting == "sizing":
        report["cost_curve_ms"] = {c: dict(zip(s.rows, s.ms)) for c, s in engines["auto"].cost_curve().by_context.items()}
    else:
        report["weights"] = args.weights
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

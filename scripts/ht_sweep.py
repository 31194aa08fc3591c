"""Sweep hidden-transfer settings (weights, draft depth, node budget, pseudo nodes) on one engine.

Each setting runs through the benchmark harness against `ar` on the same prompts, in the
same process, so every row is a side-by-side ratio. Prints a table and writes JSON.

    python scripts/ht_sweep.py --weights out/ht/a.safetensors --depths 1,2,3,4 --budgets 4,8,16,32 \
        --pseudo-nodes 1,4 --per-category 1 --max-new-tokens 64 --dtype bfloat16 --out docs/bench/ht-sweep.json

A grid is the product of the lists; `--settings` instead takes explicit
depth:budget:pseudo_nodes triples (e.g. 4:8:2,2:6:1).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from configs.schema import ModelConfig, PseudoStateModeConfig
from runtime.bench.harness import NEAR_TIE_TOL, run_bench
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="comma-separated hidden-transfer weight files")
    p.add_argument("--depths", type=ints, default=[0], help="draft depths (0 = all of the weights)")
    p.add_argument("--budgets", type=ints, default=[16])
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--pseudo-nodes", type=ints, default=[8])
    p.add_argument("--settings", help="explicit depth:budget:pseudo_nodes triples, comma-separated")
    p.add_argument("--tree", default="dynamic", choices=["dynamic", "template"])
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    engine = Engine(ModelConfig(dtype=args.dtype))
    prompts = load_prompts(default_prompts_path(), per_category=args.per_category)
    rows = []
    if args.settings:
        grid = [tuple(int(x) for x in triple.split(":")) for triple in args.settings.split(",")]
    else:
        grid = [(d, b, n) for d, b, n in itertools.product(args.depths, args.budgets, args.pseudo_nodes) if n <= b]
    for weights, (depth, budget, pseudo_nodes) in itertools.product(args.weights.split(","), grid):
        engine.set_drafter_config("ht", PseudoStateModeConfig(weights=weights, tree=args.tree, budget=budget, top_k=args.top_k, depth=depth,
                                      pseudo_nodes=pseudo_nodes))
        result = run_bench(engine, prompts, ["ht"], args.max_new_tokens, NEAR_TIE_TOL[args.dtype], args.threads, False)
        ht = result["modes"]["ht"]
        row = {**dataclasses.asdict(engine.drafters.ht), "tau": ht["mean_accepted"],
               "speedup_vs_ar": ht["speedup_vs_ar"], "ht_tokens_per_s": ht["tokens_per_s"],
               "ar_tokens_per_s": result["modes"]["ar"]["tokens_per_s"],
               "acceptance_by_depth": ht["acceptance_by_depth"],
               "identical_to_ar": ht["identical_to_ar"], "divergent": ht["divergent"],
               "near_tie_divergences": ht["near_tie_divergences"]}
        rows.append(row)
        print(f"{Path(weights).stem:<24} depth {depth} budget {budget:>3} pseudo {pseudo_nodes:>2}: tau {row['tau']:.2f}  "
              f"{row['speedup_vs_ar']:.2f}x ar  identical {row['identical_to_ar']}/{len(prompts)} "
              f"(divergent {row['divergent']}, near-tie {row['near_tie_divergences']})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompts": len(prompts), "dtype": args.dtype, "threads": args.threads,
                                          "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

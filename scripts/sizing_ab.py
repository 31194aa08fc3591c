"""Trees sized by the device's cost against the fixed budgets, side by side in one run.

Two engines on the same weights, one with [tree_sizing] cost = "auto" (this device's t(n))
and one with cost = "off" (the fixed budgets of configs/default.toml). For each prompt, `ar`
and then every mode on each engine, one after the other, so that the machine's noise
falls on all of them alike. Prints tokens/s relative to `ar` and tokens per step, and
writes JSON.

    python scripts/sizing_ab.py --modes ht,ht-pld,pld,token-recycling,medusa --per-category 1 \
        --dtype bfloat16 --threads 2 --out docs/bench/issue15-sizing-bf16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from configs.schema import DrafterConfigs, ModelConfig, TreeSizingConfig
from runtime.bench.harness import run_once
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
    modes = args.modes.split(",")
    prompts = load_prompts(default_prompts_path(), per_category=args.per_category)
    runs = {(how, mode): [] for how in engines for mode in ["ar", *modes]}
    first = engines["auto"].encode_chat(prompts[0].text)
    for how, engine in engines.items():  # build and warm every mode (and measure t(n) once), untimed
        for mode in ["ar", *modes]:
            run_once(engine, mode, first, 8)
    for i, prompt in enumerate(prompts):
        for how, engine in engines.items():
            ids = engine.encode_chat(prompt.text)
            for mode in ["ar", *modes]:
                runs[how, mode].append(run_once(engine, mode, ids, args.max_new_tokens))
        print(f"prompt {i + 1}/{len(prompts)}", flush=True)

    rows = []
    for mode in modes:
        for how in engines:
            ar, got = runs[how, "ar"], runs[how, mode]
            identical = sum(a["tokens"] == g["tokens"] for a, g in zip(ar, got))
            ratio = statistics.mean(a["seconds"] / len(a["tokens"]) / (g["seconds"] / len(g["tokens"])) for a, g in zip(ar, got))
            steps = [n for g in got for n in g["step_tokens"]]
            rows.append({"mode": mode, "sizing": how, "speedup_vs_ar": round(ratio, 3), "tau": round(statistics.mean(steps), 3),
                         "ar_tokens_per_s": round(sum(len(a["tokens"]) for a in ar) / sum(a["seconds"] for a in ar), 2),
                         "tokens_per_s": round(sum(len(g["tokens"]) for g in got) / sum(g["seconds"] for g in got), 2),
                         "identical_to_ar": identical, "prompts": len(prompts)})
            r = rows[-1]
            print(f"{mode:<16} sizing {how:<4}: {r['speedup_vs_ar']:.2f}x ar (mean of per-prompt ratios), tau {r['tau']:.2f}, "
                  f"{r['tokens_per_s']:.1f} tok/s (ar {r['ar_tokens_per_s']:.1f}), identical {identical}/{len(prompts)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                                          "cost_curve_ms": {c: dict(zip(s.rows, s.ms))
                                                            for c, s in engines["auto"].cost_curve().by_context.items()},
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

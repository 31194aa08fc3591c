"""Every mode's tokens and step sizes on the bench prompts, to check that a change of the
code left the output alone (docs/results.md, issue 13):

    python scripts/token_dump.py dump --dtype float32 --out before.json   # on the old commit
    python scripts/token_dump.py dump --dtype float32 --out after.json    # on the new one
    python scripts/token_dump.py compare before.json after.json

`dump` runs the modes through Engine.steps, as the benchmark does (greedy, 128 new tokens,
2 threads, the first prompt of each Spec-Bench category); `compare` says, per mode, on how
many prompts the tokens and the per-step token counts are the same, and how many are
identical to `ar`'s.
"""

from __future__ import annotations

import argparse
import json

import torch

MODES = "ar,ht,ht-pld,pld,medusa,pass,early-exit,token-recycling"


def dump(args) -> None:
    from configs.schema import ModelConfig
    from runtime.bench.prompts import default_prompts_path, load_prompts
    from runtime.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(ModelConfig(dtype=args.dtype, device="cpu", kernels=args.kernels))
    prompts = load_prompts(default_prompts_path(), None, args.per_category)
    result = {}
    for mode in args.modes.split(","):
        result[mode] = []
        for p in prompts:
            steps = list(engine.steps(engine.encode_chat(p.text), mode, args.max_new_tokens))
            result[mode].append({"tokens": [t for s in steps for t in s.tokens], "steps": [len(s.tokens) for s in steps]})
        print(mode, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f)


def compare(args) -> None:
    with open(args.before) as f:
        before = json.load(f)
    with open(args.after) as f:
        after = json.load(f)
    for mode in [m for m in before if m in after]:
        pairs = list(zip(before[mode], after[mode]))
        tokens = sum(a["tokens"] == b["tokens"] for a, b in pairs)
        steps = sum(a["steps"] == b["steps"] for a, b in pairs)
        vs_ar = sum(b["tokens"] == r["tokens"] for b, r in zip(after[mode], after["ar"]))
        print(f"{mode:16s} same tokens {tokens}/{len(pairs)}  same step sizes {steps}/{len(pairs)}  "
              f"identical to ar (after) {vs_ar}/{len(pairs)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--dtype", default="float32")
    d.add_argument("--out", required=True)
    d.add_argument("--modes", default=MODES)
    d.add_argument("--per-category", type=int, default=1)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--kernels", default="auto", help="auto | native | amx | avx512 | avx2 | torch (workers.kernels)")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args()
    dump(args) if args.command == "dump" else compare(args)


if __name__ == "__main__":
    main()

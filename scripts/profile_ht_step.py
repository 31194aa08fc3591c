"""Where the time of an `ht` step goes, next to an `ar` step, on the same prompts.

Wraps the parts of PseudoStateDecoder's steps with wall-clock timers (tree building, the
tree step, and inside it the LM head on nodes and drafts, acceptance and KV compaction;
the rest of the tree step is its forward pass); what is left is Python overhead. Then
times a tree step alone for growing numbers of rows (workers.cost_curve, the
minimum of 5 runs), to show what a bigger tree costs.

    python scripts/profile_ht_step.py --dtype bfloat16 --per-category 1 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import workers.tree_step as tree_step_module
from configs.schema import DrafterConfigs, ModelConfig, PseudoStateModeConfig
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine
from workers.cost_curve import step_times

TIMES: dict[str, float] = defaultdict(float)
PHASE = ["decode"]  # the timers' key: "prefill", "decode" (ht steps), "ar" or "rows"


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES[f"{PHASE[0]}:{name}"] += time.perf_counter() - t0
        return out

    return wrapper


def time_module(name: str, module: torch.nn.Module) -> None:
    """Accumulate the wall-clock time of every call of `module` (a submodule cannot be
    replaced by a plain function, so this uses forward hooks)."""
    start = [0.0]
    module.register_forward_pre_hook(lambda *_: start.__setitem__(0, time.perf_counter()))

    def done(*_):
        TIMES[f"{PHASE[0]}:{name}"] += time.perf_counter() - start[0]

    module.register_forward_hook(done)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="default")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    engine = Engine(ModelConfig(dtype=args.dtype, device="cpu"), DrafterConfigs(ht=PseudoStateModeConfig(weights=args.weights)))
    prompts = [engine.encode_chat(q.text) for q in load_prompts(default_prompts_path(), per_category=args.per_category)]
    decoder = engine.mode("ht").decoder
    tree_step_module.accept = timed("accept", tree_step_module.accept)
    decoder.build_tree = timed("build_tree", decoder.build_tree)
    decoder.cache.keep = timed("kv_keep", decoder.cache.keep)
    time_module("lm_head", engine.model.lm_head)
    step = decoder.step

    def step_by_phase(tree, choose, index, catch_up=(), slots=None):
        """The first step (the prompt caught up) is the prefill."""
        PHASE[0] = "prefill" if catch_up else "decode"
        try:
            return timed("all" if catch_up else "step", step)(tree, choose, index, catch_up, slots)
        finally:
            PHASE[0] = "decode"

    decoder.step = step_by_phase

    ht_tokens = ht_steps = 0
    ht_seconds = ar_seconds = ar_tokens = 0.0
    for ids in prompts:
        PHASE[0] = "ar"
        t0 = time.perf_counter()
        steps = list(engine.steps(ids, "ar", args.max_new_tokens))
        ar_seconds += time.perf_counter() - t0
        PHASE[0] = "decode"
        ar_tokens += sum(len(s.tokens) for s in steps)
        t0 = time.perf_counter()
        steps = list(engine.steps(ids, "ht", args.max_new_tokens))
        ht_seconds += time.perf_counter() - t0
        ht_tokens += sum(len(s.tokens) for s in steps)
        ht_steps += len(steps) - 1  # the first Step is the prefill
    n = ht_steps
    PHASE[0] = "rows"
    parts = {
        "prefill": TIMES["prefill:all"],
        "build_tree": TIMES["decode:build_tree"],
        "forward": TIMES["decode:step"] - TIMES["decode:lm_head"] - TIMES["decode:accept"] - TIMES["decode:kv_keep"],
        "lm_head": TIMES["decode:lm_head"],
        "accept": TIMES["decode:accept"],
        "kv_keep": TIMES["decode:kv_keep"],
    }
    report = {
        "dtype": args.dtype,
        "threads": args.threads,
        "prompts": len(prompts),
        "ar_ms_per_token": round(1000 * ar_seconds / ar_tokens, 2),
        "ht_ms_per_token": round(1000 * ht_seconds / ht_tokens, 2),
        "ht_steps": n,
        "ht_tokens_per_step": round(ht_tokens / (n + len(prompts)), 3),
        "ht_ms_per_step": round(1000 * (ht_seconds - parts["prefill"]) / n, 2),
        "seconds": {k: round(v, 3) for k, v in parts.items()},
        "ht_total_seconds": round(ht_seconds, 3),
        "step_ms_by_rows": step_times(engine, [1, 8, 16, 32, 48, 64, 96, 128], context=300, repeats=5)[1],
    }
    other = ht_seconds - sum(parts.values())
    report["seconds"]["python and other"] = round(other, 3)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Choose the EAGLE peer's tree settings ([eagle] depth, top_k, budget) on ShareGPT validation
prompts, never on Spec-Bench: each setting's tokens/s against `ar` (and `pld`, `ht`), tau and
identical replies, interleaved in one process, two rounds.

    python scripts/tune_eagle_tree.py --weights W --prompts 8 3,4,8 4,4,8 5,4,10 4,8,12
    python scripts/tune_eagle_tree.py --mode eagle-pld 2,4,6 3,4,8 4,4,10
"""

from __future__ import annotations

import argparse
import time

import torch

from configs.files import load_config
from configs.schema import EagleModeConfig
from runtime.engine import Engine
from runtime.training.distill import sharegpt_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="default")
    p.add_argument("--prompts", type=int, default=8, help="the first N ShareGPT validation prompts of 40-1,500 characters")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--mode", choices=("eagle", "eagle-pld"), default="eagle", help="the mode whose settings are tried")
    p.add_argument("settings", nargs="+", help="depth,top_k,budget")
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config()
    config.model.dtype = "bfloat16"
    engine = Engine.from_config(config)
    texts = [text for _, text in sharegpt_prompts("val") if 40 <= len(text) <= 1500][: args.prompts]
    prompts = [engine.encode_chat(text) for text in texts]

    def run(mode: str) -> tuple[float, float, list[list[int]]]:
        tokens = steps = 0
        replies = []
        start = time.perf_counter()
        for ids in prompts:
            reply = list(engine.steps(ids, mode, args.max_new_tokens))
            replies.append([t for s in reply for t in s.tokens])
            steps, tokens = steps + len(reply), tokens + len(replies[-1])
        return tokens / (time.perf_counter() - start), tokens / steps, replies

    for _ in range(2):
        ar, _, ar_replies = run("ar")
        line = [f"ar {ar:.1f} tok/s"]
        for setting in args.settings:
            depth, top_k, budget = map(int, setting.split(","))
            engine.set_drafter_config("eagle", EagleModeConfig(args.weights, depth, top_k, budget))
            speed, tau, replies = run(args.mode)
            same = sum(a == b for a, b in zip(ar_replies, replies))
            line.append(f"d{depth} k{top_k} b{budget} {speed / ar:.2f}x tau {tau:.2f} same {same}/{len(replies)}")
        for mode in ("pld", "ht"):
            speed, tau, _ = run(mode)
            line.append(f"{mode} {speed / ar:.2f}x tau {tau:.2f}")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()

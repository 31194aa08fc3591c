"""What a second worker could buy by verifying a disjoint part of one larger tree (issue 16,
item 3): a measured upper bound from one worker's own steps.

One worker decodes `ht` on one thread with trees built at `--budget` nodes and never cut;
each step's nodes are ranked as the tree sizer ranks them (its own acceptance estimates,
workers.tree_sizing). From the walks the target accepted, tau(m) = the tokens a step would
have committed had it verified only its m most likely nodes, for every m at once. Then,
with this device's t(n) on one thread (rows: the nodes and the pseudo states):

    one worker         t(m + pseudo) / tau(m)                  the best m
    two, disjoint      (t(m + pseudo) + o) / tau(2m - 1)        the best m; o: a step's transport

The two-worker line is optimistic on purpose: two parts of m nodes that share only the
root verify 2m - 1 nodes (a real split repeats each part's ancestors), and the worker
whose part missed the accepted path catches up for free. If even that loses, splitting a
tree does not pay on this device.

    python scripts/disjoint_parts.py --per-category 1 --out docs/bench/issue16-disjoint-parts-t1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from configs.schema import DrafterConfigs, HiddenTransferModeConfig, ModelConfig
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine
from workers.tree_sizing import monotone

TRANSPORT_MS = (0.0, 0.8, 4.0)  # none; the local transport's measured step overhead; Ray's (docs/results.md)


def committed_within(path: list[int], kept: set[int]) -> int:
    """Tokens a step commits when only `kept` nodes were verified: the path's prefix there, then a bonus token."""
    n = 0
    for node in path[1:]:
        if node not in kept:
            break
        n += 1
    return n + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--budget", type=int, default=24)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(1)
    engine = Engine(ModelConfig(dtype="bfloat16", device="cpu"), DrafterConfigs(ht=HiddenTransferModeConfig(budget=args.budget)))
    decoder = engine.mode("ht").decoder
    sizer, steps = decoder.sizer, []
    pending: dict = {}

    def uncut(tree, context, extra_rows=0.0, slots=None, certain=frozenset(), load=None):
        probs = monotone(tree, sizer.acceptance.probabilities(tree, slots))
        pending.update(tree=tree, probs=probs, context=context, depth=decoder.depth)
        return tree, dict(slots or {}), 1.0 + sum(probs[1:])

    def recorded(tree, choose, index, catch_up=(), slots=None):
        outcome = step(tree, choose, index, catch_up, slots)
        if pending.get("tree") is tree:
            steps.append({"path": outcome.path, "ranked": rank(tree, pending["probs"]), "context": pending["context"],
                          "depth": pending["depth"], "nodes": len(tree)})
        return outcome

    def rank(tree, probs):  # node -> the smallest m whose kept tree (keep_most_likely's order) holds it
        ranked = sorted(range(1, len(tree)), key=lambda i: (-probs[i], i))
        return {0: 0, **{node: r + 1 for r, node in enumerate(ranked)}}

    sizer.size, step = uncut, decoder.step
    decoder.step = recorded
    prompts = load_prompts(default_prompts_path(), per_category=args.per_category)
    for i, prompt in enumerate(prompts):
        list(engine.steps(engine.encode_chat(prompt.text), "ht", args.max_new_tokens))
        print(f"prompt {i + 1}/{len(prompts)}: {len(steps)} steps", flush=True)

    top = args.budget - 1
    tau = {m: statistics.mean(committed_within(s["path"], {n for n, r in s["ranked"].items() if r <= m}) for s in steps)
           for m in range(0, top + 1)}
    curve = engine.cost_curve(1)
    context = int(statistics.median(s["context"] for s in steps))
    t = curve.at(context)
    pseudo = decoder.settings.pseudo_nodes * decoder.max_depth * decoder.pseudo_row_cost
    one = {m: t(1 + m + pseudo) / tau[m] for m in range(0, top + 1)}
    best_one = min(one, key=one.get)
    rows = []
    for o in TRANSPORT_MS:
        two = {m: (t(1 + m + pseudo) + o) / tau[min(2 * m, top)] for m in range(0, top // 2 + 1)}
        best_two = min(two, key=two.get)
        rows.append({"transport_ms": o, "best_m": best_two, "ms_per_token": round(two[best_two], 3),
                     "vs_one_worker": round(one[best_one] / two[best_two], 3)})
        print(f"two workers, disjoint parts, transport {o} ms: {two[best_two]:.2f} ms/token at {best_two} nodes each "
              f"+ root = {one[best_one] / two[best_two]:.2f}x one worker ({one[best_one]:.2f} ms/token at {best_one} nodes)")
    print("tau by drafted nodes verified: " + ", ".join(f"{m}: {tau[m]:.3f}" for m in range(0, top + 1)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "prompts": len(prompts), "steps": len(steps), "budget": args.budget, "context": context, "pseudo_rows": round(pseudo, 3),
        "tau_by_nodes": {m: round(v, 4) for m, v in tau.items()},
        "t_ms": {n: round(t(n), 3) for n in range(1, args.budget + 8)},
        "one_worker": {"best_m": best_one, "ms_per_token": round(one[best_one], 3)}, "two_disjoint": rows}, indent=1))


if __name__ == "__main__":
    main()

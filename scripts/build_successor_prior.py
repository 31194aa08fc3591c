"""Count the successor prior of the `ht` drafts (workers.drafters.successor_prior) over the
cached self-distilled training replies, choose its weight for each draft depth on the
validation replies, and write it:

    python scripts/build_successor_prior.py                     # -> the shipped file
    python scripts/build_successor_prior.py --out prior.safetensors --ht-weights W

The data is the training set `leapfrog train --data self --max-new-tokens 384` caches
(a one-off GPU script (git history: scripts/gpu_train.py) or scripts/train_shipped_ht.sh make it). The weight of depth j is
the one (of a grid) under which a greedy chain most often gets depths 1..j right, the
weights of depths 1..j-1 already chosen; each draft's parent is the true token before it,
as it is along every accepted path. It prints top-1 by depth and the drafts a greedy chain accepts, before and after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from runtime.training import distill  # noqa: E402
from runtime.training.objective import draft_logits, encode_sequence, target_logits, valid_positions  # noqa: E402
from workers.drafters.loading import WEIGHTS_DIR, load, shipped_weights  # noqa: E402
from workers.drafters.successor_prior import SuccessorPrior  # noqa: E402
from workers.loading import load_model  # noqa: E402

GRID = [round(0.1 * i, 1) for i in range(11)]


@torch.no_grad()
def validation_drafts(model, ht, examples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per example: draft log-probs (S, k, vocab), the target's greedy tokens (S, k), and each
    draft's parent, the true token before it (S, k), at every position of the reply."""
    k, out = ht.config.k, []
    for e in examples:
        ids = e["prompt_ids"] + e["reply_ids"]
        lo, hi = valid_positions(e, k)
        ts = torch.arange(lo, hi)
        enc = encode_sequence(model, ids, ht.config.layer, ht.config.refine_layers)
        lp = torch.log_softmax(draft_logits(model, ht, enc, ts), -1)
        want = target_logits(model, enc, ts, k).argmax(-1)
        parents = torch.tensor([[ids[t + j] for j in range(1, k + 1)] for t in ts.tolist()])
        out.append((lp, want, parents))
    return out


def dense_rows(prior: SuccessorPrior, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    rows = {}
    for p in tokens.unique().tolist():
        succ, log_prior, unseen = prior.row(p)
        row = torch.full((prior.vocab_size,), unseen)
        row[torch.from_numpy(succ)] = torch.from_numpy(log_prior)
        rows[p] = row
    return rows


def hits(drafts, rows: dict[int, torch.Tensor], depth: int, w: float) -> torch.Tensor:
    """(positions,) bool: the depth's rescored argmax equals the target's greedy token."""
    out = []
    for lp, want, parents in drafts:
        bias = torch.stack([rows[p] for p in parents[:, depth - 1].tolist()])
        out.append((lp[:, depth - 1] + w * bias).argmax(-1) == want[:, depth - 1])
    return torch.cat(out)


def report(name: str, by_depth: list[torch.Tensor]) -> dict:
    ok = torch.stack(by_depth, dim=1)
    top1 = [round(x, 4) for x in ok.float().mean(0).tolist()]
    chain = round(ok.long().cumprod(1).sum(1).float().mean().item(), 4)
    print(f"{name}: top-1 by depth {top1}, drafts a greedy chain accepts {chain}", flush=True)
    return {"top1": top1, "mean_accepted": chain}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ht-weights", default=None, help="default: the shipped ht weights")
    p.add_argument("--max-new-tokens", type=int, default=384, help="which cached training set (reply length)")
    p.add_argument("--max-successors", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--out", default=str(WEIGHTS_DIR / "smollm2-135m-ht-prior.safetensors"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, folder = load_model("default", torch.bfloat16, "cpu", cuda_graphs=False)
    ht = load(args.ht_weights or shipped_weights("default", "ht"), model.args)
    data_settings = distill.DistillSettings(256, args.max_new_tokens, "bfloat16", "self")
    train = distill.read_cache(distill.cache_file(distill.default_data_dir(), folder, data_settings, "train"))
    if not train:
        raise SystemExit(f"no cached training replies of {args.max_new_tokens} tokens: make them first "
                         "(scripts/train_shipped_ht.sh, or a one-off GPU script (git history: scripts/gpu_train.py) on a GPU)")
    val = distill.distill(folder, 60, "val", settings=distill.DistillSettings(256, 128, "bfloat16", "self"))
    prior = SuccessorPrior.count([e["prompt_ids"] + e["reply_ids"] for e in train], model.args.vocab_size,
                                 [0.0] * ht.config.k, args.max_successors, args.alpha)
    print(f"counted {len(prior.successors):,} successor pairs over {len(train):,} training sequences", flush=True)
    drafts = validation_drafts(model, ht, val)
    rows = dense_rows(prior, torch.cat([d[2].reshape(-1) for d in drafts]))
    k = ht.config.k
    before = report("drafts alone", [hits(drafts, rows, d, 0.0) for d in range(1, k + 1)])
    weights, chain = [], None  # chain: positions whose drafts so far are all right
    for d in range(1, k + 1):
        by_w = {w: hits(drafts, rows, d, w) for w in GRID}
        scores = {w: (h if chain is None else h & chain).sum().item() for w, h in by_w.items()}
        weights.append(max(scores, key=lambda w: (scores[w], -w)))
        chain = by_w[weights[-1]] if chain is None else chain & by_w[weights[-1]]
    after = report(f"rescored, weights {weights}", [hits(drafts, rows, d, w) for d, w in enumerate(weights, 1)])
    info = {"training_sequences": len(train), "training_tokens": sum(len(e["prompt_ids"]) + len(e["reply_ids"]) for e in train),
            "max_new_tokens": args.max_new_tokens, "max_successors": args.max_successors, "alpha": args.alpha,
            "weights": weights, "validation": {"before": before, "after": after, "positions": int(sum(len(d[0]) for d in drafts))}}
    prior.with_weights(weights).save(args.out, extra=info)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()

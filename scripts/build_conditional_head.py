"""Train the conditional head of the `ht` drafts (workers.drafters.conditional_head) and
write it beside the shipped weights:

    python scripts/build_conditional_head.py                    # -> the shipped file
    python scripts/build_conditional_head.py --examples 200 --out head.safetensors

1. Features, cached a chunk of 100 sequences at a time (an interrupted run resumes):
   for every reply position t of ShareGPT's own first replies (teacher forcing), the
   hidden-transfer pseudo states of depths 1..k after the final norm, each depth's parent
   (the true token before the drafted one, as along any accepted path) and the target's
   greedy choice there. ShareGPT's text, not the model's own replies: the shipped `ht`
   weights trained on those replies and draft them far better than unseen text (top-1 at
   depth 1 0.76 against 0.53 on validation), so a head trained on them learns to trust
   the drafts too much.
2. Training: AdamW on the head alone, batches of rows (position, depth), the loss the
   cross-entropy of the greedy choice under the product the tree builder uses (the LM
   head on the shifted state plus the shipped prior's weighted log P(c | parent)), over
   the `--vocab` most frequent reply tokens.
3. Validation on the 60 validation replies (the model's own, every position), through the
   tree builder's own code (ConditionedDrafts.children): top-1 by depth and the drafts a
   greedy chain accepts, with the prior alone and with the head.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from runtime.training import distill  # noqa: E402
from runtime.training.objective import draft_states, encode_sequence, target_logits, valid_positions  # noqa: E402
from workers.cache_dir import cache_dir  # noqa: E402
from workers.drafters.conditional_head import ConditionalHead, ConditionalHeadConfig, ConditionedHead  # noqa: E402
from workers.drafters.loading import WEIGHTS_DIR, load, shipped_weights  # noqa: E402
from workers.drafters.successor_prior import SuccessorPrior  # noqa: E402
from workers.loading import load_model  # noqa: E402

CHUNK = 100  # sequences per cached feature file
ROWS = 64  # anchors per pseudo-state forward


@torch.no_grad()
def features(model, ht, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Pseudo states after the final norm (S, k, dim) bfloat16, parents (S, k), greedy choices (S, k)."""
    k, states, parents, wants = ht.config.k, [], [], []
    for e in examples:
        ids = e["prompt_ids"] + e["reply_ids"]
        lo, hi = valid_positions(e, k)
        if hi <= lo:
            continue
        enc = encode_sequence(model, ids, ht.config.layer, ht.config.refine_layers)
        for ts in torch.arange(lo, hi).split(ROWS):
            states.append(draft_states(model, ht, enc, ts).to(torch.bfloat16))
            wants.append(target_logits(model, enc, ts, k).argmax(-1))
            parents.append(torch.tensor([[ids[t + j] for j in range(1, k + 1)] for t in ts.tolist()]))
    return {"states": torch.cat(states), "parents": torch.cat(parents), "want": torch.cat(wants)}


def cached_features(model, ht, ht_path: Path, examples: list[dict], name: str) -> dict[str, torch.Tensor]:
    key = hashlib.sha256(ht_path.read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "conditional_head" / f"{name}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    parts, t0 = [], time.perf_counter()
    for start in range(0, len(examples), CHUNK):
        path = folder / f"{start}_{start + CHUNK}.pt"
        if not path.is_file():
            torch.save(features(model, ht, examples[start : start + CHUNK]), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        parts.append(torch.load(path))
        print(f"  {name} features: {min(start + CHUNK, len(examples))}/{len(examples)} sequences, "
              f"{sum(len(p['states']) for p in parts):,} positions, {time.perf_counter() - t0:.0f}s", flush=True)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def dense_prior(prior: SuccessorPrior, parent: int) -> torch.Tensor:
    succ, log_prior, unseen = prior.row(parent)
    row = torch.full((prior.vocab_size,), unseen)
    row[torch.from_numpy(succ).long()] = torch.from_numpy(log_prior)
    return row


def train(head: ConditionalHead, model, prior: SuccessorPrior, data: dict, vocab: torch.Tensor, steps: int, batch: int,
          lr: float, seed: int) -> list[float]:
    W = model.lm_head.weight.detach()
    dim, k = W.shape[1], data["states"].shape[1]
    scale = float(W.float().pow(2).mean().rsqrt())
    index = torch.full((W.shape[0],), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    states, parents = data["states"].reshape(-1, dim), data["parents"].reshape(-1)
    wants, depths = index[data["want"].reshape(-1)], torch.arange(k).repeat(data["states"].shape[0])
    keep = wants >= 0
    states, parents, wants, depths = states[keep], parents[keep], wants[keep], depths[keep]
    head_rows, weights = W[vocab].contiguous(), torch.tensor(prior.weights[:k])
    rows: dict[int, torch.Tensor] = {}

    def prior_rows(ps: list[int]) -> torch.Tensor:
        for p in ps:
            if p not in rows:
                rows[p] = dense_prior(prior, p)[vocab].to(torch.bfloat16)
        return torch.stack([rows[p] for p in ps]).float()

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen, losses, t0 = torch.Generator().manual_seed(seed), [], time.perf_counter()
    for i in range(steps):
        pick = torch.randint(0, len(states), (batch,), generator=gen)
        s, p, d = states[pick], parents[pick], depths[pick]
        shifted = s.float() + head.shift(s, W[p].float() * scale, d)
        logits = (shifted.to(W.dtype) @ head_rows.T).float() + weights[d][:, None] * prior_rows(p.tolist())
        loss = F.cross_entropy(logits, wants[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i % 200 == 0 or i == steps - 1:
            print(f"  step {i + 1}/{steps}  loss {np.mean(losses[-200:]):.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    return losses


@torch.no_grad()
def validate(model, prior: SuccessorPrior, head: ConditionedHead | None, data: dict, top_k: int) -> dict:
    """Top-1 by depth and the drafts a greedy chain accepts, through the tree builder's rescoring."""
    W = model.lm_head.weight.detach()
    states, parents, wants = data["states"], data["parents"], data["want"]
    S, k = parents.shape
    ok = torch.zeros(S, k, dtype=torch.bool)
    for lo in range(0, S, 512):
        s = states[lo : lo + 512]
        logprobs = torch.log_softmax((s.reshape(-1, s.shape[-1]) @ W.T).float(), -1).reshape(len(s), k, -1)
        top = torch.topk(logprobs, top_k, -1)
        lp_np, tv, ti = logprobs.numpy(), top.values.numpy(), top.indices.numpy()
        for r in range(len(s)):
            rescore = prior if head is None else head.for_step(s[r])
            for j in range(k):
                _, tokens = rescore.children(lp_np[r, j], (tv[r, j], ti[r, j]), int(parents[lo + r, j]), j + 1, 1)
                ok[lo + r, j] = tokens[0] == int(wants[lo + r, j])
    top1 = [round(x, 4) for x in ok.float().mean(0).tolist()]
    return {"top1": top1, "mean_accepted": round(ok.long().cumprod(1).sum(1).float().mean().item(), 4), "positions": S}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=600, help="ShareGPT training sequences to take features from")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--candidates", type=int, default=16, help="children per node the head rescores")
    p.add_argument("--vocab", type=int, default=16384, help="the most frequent reply tokens the loss ranges over")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(WEIGHTS_DIR / "smollm2-135m-ht-head.safetensors"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, folder = load_model("default", torch.bfloat16, "cpu", cuda_graphs=False)
    ht_path = shipped_weights("default", "ht")
    ht = load(ht_path, model.args)
    prior = SuccessorPrior.load(WEIGHTS_DIR / "smollm2-135m-ht-prior.safetensors", model.args.vocab_size)
    text = distill.distill(folder, args.examples, "train", settings=distill.DistillSettings(256, 384, "bfloat16", "sharegpt"))
    val = distill.distill(folder, 60, "val", settings=distill.DistillSettings(256, 128, "bfloat16", "self"))
    train_data = cached_features(model, ht, ht_path, text[: args.examples], f"sharegpt{args.examples}")
    val_data = cached_features(model, ht, ht_path, val, "val60")
    counts = torch.bincount(torch.tensor([t for e in text for t in e["reply_ids"]]), minlength=model.args.vocab_size)
    vocab = torch.argsort(-counts)[: args.vocab]
    k = ht.config.k
    rows = train_data["states"].shape[0] * k
    steps = max(int(args.epochs * rows / args.batch), 1)
    print(f"{rows:,} training rows, {steps} steps of {args.batch}", flush=True)
    head = ConditionalHead(model.args, ConditionalHeadConfig(args.hidden, k, args.candidates))
    t_train = time.perf_counter()
    losses = train(head, model, prior, train_data, vocab, steps, args.batch, args.lr, args.seed)
    train_s = time.perf_counter() - t_train
    before = validate(model, prior, None, val_data, 8)
    print(f"prior alone: top-1 by depth {before['top1']}, drafts a greedy chain accepts {before['mean_accepted']}")
    after = validate(model, prior, ConditionedHead(head, model.lm_head.weight, prior), val_data, 8)
    print(f"with the head: top-1 by depth {after['top1']}, drafts a greedy chain accepts {after['mean_accepted']}")
    info = {"examples": args.examples, "positions": int(train_data["states"].shape[0]), "rows": rows, "steps": steps,
            "batch": args.batch, "lr": args.lr, "vocab": args.vocab, "time_s": round(train_s), "final_loss": round(float(np.mean(losses[-200:])), 4),
            "validation": {"prior": before, "head": after}}
    head.save(args.out, extra=info)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()

"""Train the EAGLE peer (`leapfrog train --drafter eagle`; workers.drafters.eagle).

The data are the pseudo-state drafters' (runtime.training.distill, cached: ShareGPT
training prompts with the model's own replies). Then:

  vocabulary  the `vocab` most frequent reply tokens of the training data (FR-Spec)
  features    the target's last hidden states f over prompt + reply, computed once in the
              training dtype (bfloat16 is what decoding feeds), several sequences a
              forward, and cached beside OUT (OUT.features/, one file per 64 sequences:
              a stop loses at most one)
  training    AdamW on fc and the layer, float32, the target frozen, on the target's device,
              `batch` sequences a step in one right-padded forward. Row q of a sequence
              is [f_q ; e(x_{q+1})] (teacher features, as EAGLE-1), causal over the last
              `context` prompt rows and the reply; its output o_q is scored by
                  CE(head(norm(o_q)), x_{q+2})  over reply targets in the draft vocabulary
                  + reg_weight * SmoothL1(o_q, f_{q+1})
              (EAGLE-1's two losses, its weights swapped: acceptance is what we want)
  validation  depth-1 top-1 accuracy of the drafts on the validation replies
The layer starts as a copy of the target's last layer, fc as [I, I]. Checkpoints every
`checkpoint_every` steps; --resume continues from one.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs.training import TrainConfig, TrainError
from runtime.training.objective import PrefixKV
from runtime.training.trainer import SequenceOrder, data_fingerprint, learning_rate, save_checkpoint, weights_paths
from workers.drafters.eagle import EagleConfig, EagleModel, draft_head, signature
from workers.model import AttentionContext, Transformer

CONTEXT = 64  # prompt rows (before the reply) each training sequence keeps as context
REG_WEIGHT = 0.1
SHARD = 64  # sequences per feature file
FEATURE_BATCH = (8, 64)  # sequences a feature forward: (CPU, GPU)


def draft_vocabulary(examples: list[dict], size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent reply tokens (sorted by id) and the share of reply tokens they cover."""
    counts = Counter(t for e in examples for t in e["reply_ids"])
    top = [t for t, _ in counts.most_common(size)]
    top += [t for t in range(vocab_size) if t not in counts][: size - len(top)]  # a small data set: pad
    ids = torch.tensor(sorted(top))
    return ids, draft_vocabulary_coverage(examples, ids)


def draft_vocabulary_coverage(examples: list[dict], vocab_ids: torch.Tensor) -> float:
    """The share of the examples' reply tokens in the draft vocabulary."""
    vocab = set(vocab_ids.tolist())
    tokens = [t for e in examples for t in e["reply_ids"]]
    return sum(t in vocab for t in tokens) / max(len(tokens), 1)


@torch.inference_mode()
def features(model: Transformer, examples: list[dict]) -> list[torch.Tensor]:
    """The target's last hidden states of each example (prompt + reply, dim), before the final
    norm, in bfloat16 on the CPU: one right-padded causal forward for all of them (a real row
    never sees the padding after it)."""
    ids = [e["prompt_ids"] + e["reply_ids"] for e in examples]
    n = max(len(i) for i in ids)
    tokens = torch.tensor([i + [0] * (n - len(i)) for i in ids], device=model.device)
    h = model.run_layers(model.embed(tokens), model.context(torch.arange(n, device=model.device)))
    return [h[b, : len(i)].to(torch.bfloat16).cpu() for b, i in enumerate(ids)]


def feature_folder(cfg: TrainConfig) -> Path:
    """Where a run keeps its cached features (train/ and val/): beside its weights."""
    return weights_paths(cfg.out)[0].with_suffix(".features")


def cached_features(model: Transformer, examples: list[dict], folder: Path, progress: bool, log) -> list[torch.Tensor]:
    """Features of every example, from `folder` where a shard is there, computed (and saved) otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[torch.Tensor] = []
    computed = 0
    per_pass = FEATURE_BATCH[model.device.type == "cuda"]
    bar = tqdm(total=len(examples), desc="eagle features", unit="seq", disable=not progress)
    for start in range(0, len(examples), SHARD):
        chunk = examples[start : start + SHARD]
        path = folder / f"{start // SHARD:05d}-{data_fingerprint(chunk)}.pt"
        if path.is_file():
            feats = torch.load(path, weights_only=True)
        else:
            order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]["reply_ids"]) + len(chunk[i]["prompt_ids"]))
            feats = [None] * len(chunk)
            for first in range(0, len(order), per_pass):  # similar lengths together: little padding
                part = order[first : first + per_pass]
                for i, f in zip(part, features(model, [chunk[i] for i in part])):
                    feats[i] = f
            save_checkpoint(path, feats)
            computed += len(chunk)
        out += feats
        bar.update(len(chunk))
    bar.close()
    log(f"[eagle] features of {len(out)} sequences in {folder}: {len(out) - computed} read, {computed} computed")
    return out


def start_model(model: Transformer, vocab_ids: torch.Tensor) -> EagleModel:
    """fc = [I, I], the layer a float32 copy of the target's last one."""
    args = model.args
    eagle = EagleModel(args, EagleConfig(vocab=len(vocab_ids)))
    eagle.vocab_ids.copy_(vocab_ids)
    last = model.layers[args.n_layers - 1].state_dict()
    eagle.layer.load_state_dict({name: t.float().cpu() for name, t in last.items()})
    with torch.no_grad():
        eagle.fc.weight.copy_(torch.cat((torch.eye(args.dim), torch.eye(args.dim)), dim=1))
        eagle.fc.bias.zero_()
    return eagle


@dataclass
class Rows:
    """The training rows of B sequences, right-padded to the longest (N rows). Sequence b has
    rows q = start_b .. T_b - 2 (start_b = the first prompt row kept as context)."""

    o: torch.Tensor  # (B, N, dim) outputs of the rows
    o2: torch.Tensor | None  # (B, N - 1, dim) rows 1.. again, fed the draft model's own o of the row before
    f_next: torch.Tensor  # (B, N, dim) their feature targets f_{q+1}
    targets: torch.Tensor  # (B, N) draft-vocabulary index of x_{q+2} (-100: none, not a target, or padding)
    scored: torch.Tensor  # (B, N) bool: reply rows, whose f_{q+1} is a regression target
    first: list[int]  # per sequence, the first row with a reply target
    rows: list[int]  # per sequence, its real rows (the rest is padding)


class Objective:
    """The loss and the validation of batches of sequences, on the frozen target's norm and
    draft head (float32, on the target's device)."""

    def __init__(self, model: Transformer, eagle: EagleModel):
        self.model, self.eagle, self.device = model, eagle, model.device
        self.embed = model.embed_tokens.weight.detach().float()
        self.head = draft_head(model, eagle.vocab_ids).float()
        self.norm_weight, self.eps = model.norm.weight.detach().float(), model.args.norm_eps
        index = torch.full((model.args.vocab_size,), -100)  # target id -> draft vocabulary index (-100: outside)
        index[eagle.vocab_ids.cpu()] = torch.arange(len(eagle.vocab_ids))
        self.draft_index = index
        self.inv_freq = model.inv_freq.to(self.device)

    def rows(self, examples: list[dict], feats: list[torch.Tensor], depth2: bool = True) -> Rows:
        """Row q of a sequence is [f_q ; e(x_{q+1})], causal over the rows before it; its output
        o_q drafts x_{q+2}. With `depth2`, o2_q is row q again fed o_{q-1} (the draft model's own
        prediction of f_q) instead of f_q, seeing the real rows before q and itself, as a node at
        depth 2 of a tree is drafted (EAGLE-3's training-time test, one step)."""
        B, dim = len(examples), self.model.args.dim
        starts = [max(0, len(e["prompt_ids"]) - CONTEXT) for e in examples]
        rows = [len(e["prompt_ids"]) + len(e["reply_ids"]) - 1 - s for e, s in zip(examples, starts)]
        n = max(rows)
        f, f_next = torch.zeros(B, n, dim, dtype=torch.bfloat16), torch.zeros(B, n, dim, dtype=torch.bfloat16)
        tokens = torch.zeros(B, n, dtype=torch.long)
        targets = torch.full((B, n), -100)
        scored = torch.zeros(B, n, dtype=torch.bool)
        firsts = []
        for b, (e, s, k) in enumerate(zip(examples, starts, rows)):
            ids = torch.tensor(e["prompt_ids"] + e["reply_ids"])
            f[b, :k], f_next[b, :k] = feats[b][s:-1], feats[b][s + 1 :]
            tokens[b, :k] = ids[s + 1 :]
            nxt = torch.cat((ids[s + 2 :], torch.tensor([-1])))  # x_{q+2}; the last row has none
            first = max(len(e["prompt_ids"]) - 2 - s, 0)  # prompt tokens are context, not targets
            targets[b, first:k] = torch.where(nxt >= 0, self.draft_index[nxt.clamp(min=0)], -100)[first:]
            scored[b, first:k] = True
            firsts.append(first)
        positions = torch.tensor(starts)[:, None] + torch.arange(n)  # padding rows go on counting
        angles = positions.to(self.device).float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.model.rope_scale, angles.sin() * self.model.rope_scale  # (B, n, head_dim)
        f, e = f.to(self.device).float(), self.embed[tokens.to(self.device)]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        kv = RecordingKV()
        o = self.eagle(f, e, AttentionContext(cos, sin, causal, kv))
        o2 = None
        if depth2:
            # o2 row j (row j + 1 at depth 2) sees the real rows 0..j and itself
            mask = torch.cat((causal[:-1], torch.eye(n - 1, dtype=torch.bool, device=self.device)), dim=1)
            o2 = self.eagle(o[:, :-1], e[:, 1:], AttentionContext(cos[:, 1:], sin[:, 1:], mask, PrefixKV([kv.k], [kv.v])))
        return Rows(o, o2, f_next.to(self.device).float(), targets.to(self.device), scored.to(self.device), firsts, rows)

    def logits(self, o: torch.Tensor) -> torch.Tensor:
        normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return normed @ self.head.T

    def loss(self, examples: list[dict], feats: list[torch.Tensor], unroll: int) -> tuple[torch.Tensor, int]:
        """The summed loss of depth 1 (and of depth 2 with unroll 2) and the count of its token targets."""
        r = self.rows(examples, feats, depth2=unroll == 2)
        total, count = self.depth_loss(r.o, r.f_next, r.targets, r.scored)
        if unroll == 2:  # o2 row j is row j + 1 at depth 2
            loss2, count2 = self.depth_loss(r.o2, r.f_next[:, 1:], r.targets[:, 1:], r.scored[:, 1:])
            total, count = total + loss2, count + count2
        return total, count

    def depth_loss(self, o: torch.Tensor, f_next: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, int]:
        ce = F.cross_entropy(self.logits(o).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        reg = (F.smooth_l1_loss(o, f_next, reduction="none").sum(-1) * scored).sum() / o.shape[-1]
        return ce + REG_WEIGHT * reg, int((targets >= 0).sum())

    @torch.no_grad()
    def accuracy(self, examples: list[dict], feats: list[torch.Tensor], batch: int = 16) -> dict:
        """Top-1 over the reply targets (in the draft vocabulary or not) at depth 1 and, from
        the draft model's own predicted feature, at depth 2."""
        hits = hits2 = total = covered = 0
        for start in range(0, len(examples), batch):
            r = self.rows(examples[start : start + batch], feats[start : start + batch])
            total += sum(k - first - 1 for k, first in zip(r.rows, r.first))  # every reply token after the first has a row
            hits += int((self.logits(r.o).argmax(-1) == r.targets).sum())  # padding and prompt rows: -100, never a hit
            hits2 += int((self.logits(r.o2).argmax(-1) == r.targets[:, 1:]).sum())
            covered += int((r.targets >= 0).sum())
        n = max(total, 1)
        return {"top1": hits / n, "top1_depth2": hits2 / n, "in_vocab": covered / n, "targets": total}


class RecordingKV:
    """Stands in for a KVCache in a pass whose keys and values (with their gradients) a later
    pass attends to, as a drafter's tree rows attend to its committed rows."""

    def __init__(self):
        self.k = self.v = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = k, v
        return k, v


def train_eagle(model: Transformer, train_examples: list[dict], val_examples: list[dict], cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) the EAGLE peer; saves weights, summary JSON and checkpoint; returns the summary."""
    train_examples = [e for e in train_examples if len(e["reply_ids"]) >= 2]
    if not train_examples:
        raise TrainError("no training example has a reply of at least 2 tokens")
    out, summary_path, ckpt_path = weights_paths(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    train_feats = cached_features(model, train_examples, feature_folder(cfg) / "train", cfg.progress, log)
    val_feats = cached_features(model, val_examples, feature_folder(cfg) / "val", cfg.progress, log)

    resuming = cfg.resume and ckpt_path.is_file()
    if cfg.init and not resuming:  # a checkpoint to resume replaces the start
        eagle = EagleModel.load(cfg.init, model.args)
        log(f"[eagle] started from {cfg.init}")
    else:
        eagle = start_model(model, draft_vocabulary(train_examples, cfg.vocab, model.args.vocab_size)[0])
    eagle.to(model.device)
    opt = torch.optim.AdamW(eagle.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = SequenceOrder(len(train_examples), generator)
    step, elapsed, history, val_history = 0, 0.0, [], []
    if resuming:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        try:
            if state["model"] != signature(model.args):
                raise RuntimeError(f"saved for a model {state['model']}")
            eagle.load_state_dict(state["eagle"])
        except RuntimeError as e:
            raise TrainError(f"{ckpt_path} does not fit this run: {e}") from None
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        sampler.perm, sampler.cursor = state["perm"], state["cursor"]
        step, elapsed, history, val_history = state["step"], state["elapsed"], state["history"], state["val_history"]
        log(f"[eagle] resumed from {ckpt_path} at step {step}")
    coverage = draft_vocabulary_coverage(train_examples, eagle.vocab_ids)
    log(f"[eagle] draft vocabulary: {len(eagle.vocab_ids)} tokens cover {coverage:.1%} of the training replies")
    objective = Objective(model, eagle)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "eagle": eagle.state_dict(), "optimizer": opt.state_dict(), "generator": generator.get_state(),
            "perm": sampler.perm, "cursor": sampler.cursor, "step": step, "elapsed": elapsed, "history": history,
            "val_history": val_history, "model": signature(model.args),
        })  # fmt: skip

    def validate() -> None:
        if val_examples:
            m = objective.accuracy(val_examples, val_feats)
            val_history.append({"step": step, **m})
            log(f"[eagle] step {step}: validation top-1 depth 1 {m['top1']:.3f}, depth 2 {m['top1_depth2']:.3f} "
                f"(targets in the draft vocabulary {m['in_vocab']:.3f})")

    if step == 0:
        validate()
    bar = tqdm(total=cfg.steps, initial=step, desc="eagle train", unit="step", disable=not cfg.progress)
    window: list[float] = []
    while step < cfg.steps:
        t0 = time.monotonic()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        opt.zero_grad()
        chosen = sampler.take(cfg.batch)
        total, count = objective.loss([train_examples[i] for i in chosen], [train_feats[i] for i in chosen], cfg.unroll)
        loss = total / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(eagle.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.monotonic() - t0
        window.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            history.append({"step": step, "loss": sum(window) / len(window), "elapsed_s": elapsed})
            log(f"[eagle] step {step}: loss {history[-1]['loss']:.3f} ({elapsed:.0f} s)")
            window = []
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            validate()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    summary = {
        "kind": "eagle", "steps": step, "time_s": round(elapsed, 1), "parameters": eagle.parameter_count(),
        "train_sequences": len(train_examples), "reply_tokens": sum(len(e["reply_ids"]) for e in train_examples),
        "vocab": len(eagle.vocab_ids), "vocab_coverage": coverage, "batch": cfg.batch, "lr": cfg.lr, "unroll": cfg.unroll,
        "init": cfg.init,
        "history": history, "validation": val_history,
    }  # fmt: skip
    short = {k: summary[k] for k in ("steps", "time_s", "train_sequences", "reply_tokens", "vocab")}
    eagle.save(out, extra={"training": short})
    summary_path.write_text(json.dumps(summary, indent=1))
    log(f"[eagle] wrote {out} and {summary_path} (resumable checkpoint: {ckpt_path})")
    return summary

"""Train the EAGLE peer (`leapfrog train --drafter eagle`; workers.drafters.eagle).

The data are the pseudo-state drafters' (runtime.training.distill, cached: ShareGPT
training prompts with the model's own replies). Then:

  vocabulary  the `vocab` most frequent reply tokens of the training data (FR-Spec)
  features    the target's last hidden states f over prompt + reply, computed once in the
              training dtype (bfloat16 is what decoding feeds) and cached beside OUT
              (OUT.features/, one file per 64 sequences: a stop loses at most one)
  training    AdamW on fc and the layer, float32, the target frozen. Row q of a sequence
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
from runtime.decoding.autoregressive import prefill_hidden
from runtime.training.objective import PrefixKV
from runtime.training.trainer import SequenceOrder, data_fingerprint, learning_rate, save_checkpoint, weights_paths
from workers.drafters.eagle import EagleConfig, EagleModel, draft_head, signature
from workers.model import AttentionContext, Transformer

CONTEXT = 64  # prompt rows (before the reply) each training sequence keeps as context
REG_WEIGHT = 0.1
SHARD = 64  # sequences per feature file


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
def sequence_features(model: Transformer, example: dict) -> torch.Tensor:
    """The target's last hidden states (prompt + reply, dim), before the final norm, in bfloat16."""
    ids = example["prompt_ids"] + example["reply_ids"]
    return prefill_hidden(model, model.new_cache(len(ids)), ids).to(torch.bfloat16).cpu()


def cached_features(model: Transformer, examples: list[dict], folder: Path, progress: bool, log) -> list[torch.Tensor]:
    """Features of every example, from `folder` where a shard is there, computed (and saved) otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[torch.Tensor] = []
    computed = 0
    bar = tqdm(total=len(examples), desc="eagle features", unit="seq", disable=not progress)
    for start in range(0, len(examples), SHARD):
        chunk = examples[start : start + SHARD]
        path = folder / f"{start // SHARD:05d}-{data_fingerprint(chunk)}.pt"
        if path.is_file():
            feats = torch.load(path, weights_only=True)
        else:
            feats = [sequence_features(model, e) for e in chunk]
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


class Objective:
    """The loss and the validation of one sequence, on the frozen target's norm and draft head (float32)."""

    def __init__(self, model: Transformer, eagle: EagleModel):
        self.model, self.eagle = model, eagle
        self.embed = model.embed_tokens.weight.detach().float().cpu()
        self.head = draft_head(model, eagle.vocab_ids).float().cpu()
        self.norm_weight, self.eps = model.norm.weight.detach().float().cpu(), model.args.norm_eps
        index = torch.full((model.args.vocab_size,), -100)  # target id -> draft vocabulary index (-100: outside)
        index[eagle.vocab_ids] = torch.arange(len(eagle.vocab_ids))
        self.draft_index = index
        self.inv_freq = model.inv_freq

    def outputs(self, feats: torch.Tensor, ids: torch.Tensor, start: int, depth2: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """o_q for rows q = start .. T - 2 (rows, dim), and with `depth2` o2_q for q = start + 1 .. T - 2
        (rows - 1, dim): row q again, fed o_{q-1} (the draft model's own prediction of f_q)
        instead of f_q, seeing the real rows before q and itself, as a node at depth 2 of a
        tree is drafted (EAGLE-3's training-time test, one step)."""
        f = feats[start:-1].float()[None]
        e = self.embed[ids[start + 1 :]][None]
        positions = torch.arange(start, len(ids) - 1)
        angles = positions.float()[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        n, scale = len(positions), self.model.rope_scale
        cos, sin = angles.cos() * scale, angles.sin() * scale
        kv = RecordingKV()
        o = self.eagle(f, e, AttentionContext(cos, sin, torch.ones(n, n, dtype=torch.bool).tril(), kv))[0]
        if not depth2:
            return o, None
        mask = torch.cat((torch.ones(n - 1, n, dtype=torch.bool).tril(), torch.eye(n - 1, dtype=torch.bool)), dim=1)
        o2 = self.eagle(o[None, :-1], e[:, 1:], AttentionContext(cos[1:], sin[1:], mask, PrefixKV([kv.k], [kv.v])))[0]
        return o, o2

    def logits(self, o: torch.Tensor) -> torch.Tensor:
        normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return normed @ self.head.T

    def rows(self, example: dict, feats: torch.Tensor, depth2: bool = True) -> Rows:
        p = len(example["prompt_ids"])
        ids = torch.tensor(example["prompt_ids"] + example["reply_ids"])
        start = max(0, p - CONTEXT)
        o, o2 = self.outputs(feats, ids, start, depth2)  # rows start .. T-2
        tokens = torch.cat((ids[start + 2 :], torch.tensor([-1])))  # x_{q+2}; the last row has none
        targets = torch.where(tokens >= 0, self.draft_index[tokens.clamp(min=0)], torch.tensor(-100))
        first = max(p - 2 - start, 0)
        targets[:first] = -100  # prompt tokens are context, not targets
        return Rows(o, o2, feats[start + 1 :].float(), targets, first)

    def loss(self, example: dict, feats: torch.Tensor, unroll: int) -> tuple[torch.Tensor, int]:
        """The summed loss of depth 1 (and of depth 2 with unroll 2) and the count of its token targets."""
        r = self.rows(example, feats, depth2=unroll == 2)
        total, count = self.depth_loss(r.o[r.first :], r.f_next[r.first :], r.targets[r.first :])
        if unroll == 2:
            first = max(r.first, 1)
            loss2, count2 = self.depth_loss(r.o2[first - 1 :], r.f_next[first:], r.targets[first:])
            total, count = total + loss2, count + count2
        return total, count

    def depth_loss(self, o: torch.Tensor, f_next: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        ce = F.cross_entropy(self.logits(o), targets, ignore_index=-100, reduction="sum")
        reg = F.smooth_l1_loss(o, f_next, reduction="sum") / o.shape[-1]
        return ce + REG_WEIGHT * reg, int((targets >= 0).sum())

    @torch.no_grad()
    def accuracy(self, examples: list[dict], feats: list[torch.Tensor]) -> dict:
        """Top-1 over the reply targets (in the draft vocabulary or not) at depth 1 and, from
        the draft model's own predicted feature, at depth 2."""
        hits = hits2 = total = covered = 0
        for example, f in zip(examples, feats):
            r = self.rows(example, f)
            total += len(r.targets) - r.first - 1  # every reply token after the first has a row
            hits += int((self.logits(r.o[r.first :]).argmax(-1) == r.targets[r.first :]).sum())
            first = max(r.first, 1)
            hits2 += int((self.logits(r.o2[first - 1 :]).argmax(-1) == r.targets[first:]).sum())
            covered += int((r.targets[r.first :] >= 0).sum())
        n = max(total, 1)
        return {"top1": hits / n, "top1_depth2": hits2 / n, "in_vocab": covered / n, "targets": total}


@dataclass
class Rows:
    o: torch.Tensor  # (rows, dim) outputs of rows q = start .. T - 2
    o2: torch.Tensor | None  # (rows - 1, dim) the same rows from q = start + 1, fed the draft model's own features
    f_next: torch.Tensor  # (rows, dim) their feature targets f_{q+1}
    targets: torch.Tensor  # (rows,) draft-vocabulary index of x_{q+2} (-100: none, or not a target)
    first: int  # the first row with a reply target


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
    feature_dir = out.with_suffix(".features")
    train_feats = cached_features(model, train_examples, feature_dir / "train", cfg.progress, log)
    val_feats = cached_features(model, val_examples, feature_dir / "val", cfg.progress, log)

    resuming = cfg.resume and ckpt_path.is_file()
    if cfg.init and not resuming:  # a checkpoint to resume replaces the start
        eagle = EagleModel.load(cfg.init, model.args)
        log(f"[eagle] started from {cfg.init}")
    else:
        eagle = start_model(model, draft_vocabulary(train_examples, cfg.vocab, model.args.vocab_size)[0])
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
        losses = [objective.loss(train_examples[i], train_feats[i], cfg.unroll) for i in sampler.take(cfg.batch)]
        n = max(sum(count for _, count in losses), 1)
        loss = sum(total for total, _ in losses) / n
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

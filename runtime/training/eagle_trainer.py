"""Train the EAGLE peer (`leapfrog train --drafter eagle`; workers.drafters.eagle).

The data are the pseudo-state drafters' (runtime.training.distill, cached: ShareGPT
training prompts with the model's own replies). Then:

  vocabulary  the `vocab` most frequent reply tokens of the training data (FR-Spec)
  features    the target's last hidden states f over prompt + reply, computed once and
              cached beside OUT (runtime.training.feature_cache)
  training    the one training loop (runtime.training.loop): AdamW on fc and the layer,
              float32, the target frozen, on the target's device, `batch` sequences a
              step in one right-padded forward, the gradient clipped to norm 1. Row q
              of a sequence is [f_q ; e(x_{q+1})] (teacher features, as EAGLE-1), causal
              over the last `context` prompt rows and the reply; its output o_q is scored by
                  CE(head(norm(o_q)), x_{q+2})  over reply targets in the draft vocabulary
                  + reg_weight * SmoothL1(o_q, f_{q+1})
              (EAGLE-1's two losses, its weights swapped: acceptance is what we want)
  validation  top-1 accuracy of the drafts on the validation replies at depth 1 and 2,
              before the first step, every `eval_every` steps and at the end (not
              counted in the training time)
The layer starts as a copy of the target's last layer, fc as [I, I] (or from --init
weights). Checkpoints every `checkpoint_every` steps; --resume continues from one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from configs.training import TrainConfig, TrainError
from runtime.training.feature_cache import cached_features, feature_folder
from runtime.training.loop import LoopSettings, Progress, train_loop, weights_paths
from runtime.training.objective import PrefixKV
from runtime.training.token_counts import most_frequent
from workers.drafters.draft_vocabulary import draft_head
from workers.drafters.eagle import EagleConfig, EagleModel, signature
from workers.model import AttentionContext, Transformer

CONTEXT = 64  # prompt rows (before the reply) each training sequence keeps as context
REG_WEIGHT = 0.1


def draft_vocabulary(examples: list[dict], size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent reply tokens (sorted by id) and the share of reply tokens they cover."""
    tokens = torch.tensor([t for e in examples for t in e["reply_ids"]], dtype=torch.int64)
    ids = most_frequent(torch.bincount(tokens, minlength=vocab_size)[:vocab_size], size)  # a small data set: padded by id
    return ids, draft_vocabulary_coverage(examples, ids)


def draft_vocabulary_coverage(examples: list[dict], vocab_ids: torch.Tensor) -> float:
    """The share of the examples' reply tokens in the draft vocabulary."""
    vocab = set(vocab_ids.tolist())
    tokens = [t for e in examples for t in e["reply_ids"]]
    return sum(t in vocab for t in tokens) / max(len(tokens), 1)


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


class EagleTask:
    """The training of the EAGLE peer as runtime.training.loop sees it: Objective's loss
    (each reply target weighs the same) on cached features, validation before the first
    step too, the gradient clipped to norm 1, a loss record each log line."""

    def __init__(self, model: Transformer, train_examples: list[dict], val_examples: list[dict], cfg: TrainConfig, log):
        self.model, self.cfg = model, cfg
        self.examples, self.val_examples = [e for e in train_examples if len(e["reply_ids"]) >= 2], val_examples
        if not self.examples:
            raise TrainError("no training example has a reply of at least 2 tokens")
        self.settings = LoopSettings(tag="eagle", micro_batch=cfg.batch, clip_grad_norm=1.0, validate_first=True,
                                     time_validation=False, loss_history="log")
        model.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.train_feats = cached_features(model, self.examples, feature_folder(cfg) / "train", cfg.progress, log)
        self.val_feats = cached_features(model, val_examples, feature_folder(cfg) / "val", cfg.progress, log)
        resuming = cfg.resume and weights_paths(cfg.out)[2].is_file()
        if cfg.init and not resuming:  # a checkpoint to resume replaces the start
            self.eagle = EagleModel.load(cfg.init, model.args)
            log(f"[eagle] started from {cfg.init}")
        else:
            self.eagle = start_model(model, draft_vocabulary(self.examples, cfg.vocab, model.args.vocab_size)[0])
        self.eagle.to(model.device)
        self.weights_in_place()

    def weights_in_place(self) -> None:
        """What follows from the draft vocabulary: its coverage and the objective's head."""
        self.coverage = draft_vocabulary_coverage(self.examples, self.eagle.vocab_ids)
        self.objective = Objective(self.model, self.eagle)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.eagle.parameters())

    def loss(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        return self.objective.loss([self.examples[i] for i in indices], [self.train_feats[i] for i in indices],
                                   self.cfg.unroll)

    def validate(self) -> dict | None:
        return self.objective.accuracy(self.val_examples, self.val_feats) if self.val_examples else None

    def describe(self, m: dict) -> str:
        return (f"validation top-1 depth 1 {m['top1']:.3f}, depth 2 {m['top1_depth2']:.3f} "
                f"(targets in the draft vocabulary {m['in_vocab']:.3f})")

    def started(self) -> str:
        return (f"[eagle] {self.eagle.parameter_count():,} parameters; draft vocabulary: {len(self.eagle.vocab_ids)} "
                f"tokens cover {self.coverage:.1%} of the training replies; {len(self.examples)} training / "
                f"{len(self.val_examples)} validation sequences; {self.cfg.steps} steps of {self.cfg.batch}")

    def checkpoint_state(self) -> dict:
        return {"eagle": self.eagle.state_dict(), "model": signature(self.model.args)}

    def restore(self, state: dict, path: Path) -> None:
        try:
            if state["model"] != signature(self.model.args):
                raise RuntimeError(f"saved for a model {state['model']}")
            self.eagle.load_state_dict(state["eagle"])
        except RuntimeError as e:
            raise TrainError(f"{path} does not fit this run: {e}") from None
        self.weights_in_place()  # the checkpoint's vocabulary

    def summary(self, progress: Progress, final: dict | None) -> dict:
        cfg = self.cfg
        return {
            "kind": "eagle", "steps": progress.step, "time_s": round(progress.elapsed, 1),
            "parameters": self.eagle.parameter_count(), "train_sequences": len(self.examples),
            "reply_tokens": sum(len(e["reply_ids"]) for e in self.examples), "vocab": len(self.eagle.vocab_ids),
            "vocab_coverage": self.coverage, "batch": cfg.batch, "lr": cfg.lr, "unroll": cfg.unroll, "init": cfg.init,
            "history": progress.history, "validation": progress.val_history,
        }  # fmt: skip

    def save(self, path: Path, summary: dict) -> None:
        short = {k: summary[k] for k in ("steps", "time_s", "train_sequences", "reply_tokens", "vocab")}
        self.eagle.save(path, extra={"training": short})


def train_eagle(model: Transformer, train_examples: list[dict], val_examples: list[dict], cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) the EAGLE peer; saves weights, summary JSON and checkpoint; returns the summary."""
    return train_loop(EagleTask(model, train_examples, val_examples, cfg, log), cfg, log)

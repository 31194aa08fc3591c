"""Train pseudo-state drafters by self-distillation (`leapfrog train-ht`).

Any kind of workers.drafters.pseudo_states trains here with the same data and loss:
hidden transfer (`--drafter ht`, at --layer L), Medusa heads (`medusa`, L = N) and PaSS
look-ahead embeddings (`pass`, L = 0). The backbone is frozen; only the drafter's
parameters learn. For each training sequence (a ShareGPT prompt and the model's own
greedy reply, from runtime.distill):

  1. Under no_grad, the whole model runs once over the real tokens with a KV cache,
     which gives the hidden state after L layers at every position (h_L), the target
     logits, and the K/V of every layer for positions 0..T-1.
  2. S positions t of the reply region (t + k < T) are drawn. The drafter maps h_L[t]
     to k pseudo states, placed at positions t+1..t+k, and they run through layers
     [L, N) against a read-only copy of the cached K/V (PrefixKV). Pseudo state (t, j)
     sees real positions <= t and, with pseudo attention, pseudo states (t, < j): the
     same context as at inference (runtime.ht_decoding), where the real tokens after t
     are not known yet.
  3. The LM head on pseudo state (t, j) drafts the token at t+j+1; the loss is
     KL(target softmax at t+j || draft softmax), averaged over the S*k drafts.

Only S*k rows per sequence carry gradients, so a step costs one no_grad forward of the
sequence plus a small forward/backward through the upper layers.

Validation reports, per draft depth j, top-1 and top-5 accuracy of the draft against
the target's argmax at t+j (the greedy token at t+j+1), and the mean number of drafts a
single greedy chain would accept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.drafters.pseudo_states import KINDS, PseudoStateConfig, PseudoStateDrafter, build, check_layer, model_signature
from workers.model import Transformer

TRAIN_DTYPES = ("float32", "bfloat16")
EVAL_CHUNK = 64  # positions per forward in validation


class TrainError(ValueError):
    """A training setup that cannot work, with the reason in words."""


@dataclass
class TrainConfig:
    checkpoint: str = "default"
    dtype: str = "float32"  # backbone dtype; the transfer and the loss stay float32
    device: str = "auto"
    threads: int = 2
    drafter: str = "ht"  # ht | medusa | pass (workers.drafters.pseudo_states)
    layer: int | None = None  # ht only; None: half the layers
    k: int = 3
    pseudo_attention: bool = True
    examples: int = 1000  # distilled training examples
    val_examples: int | None = None  # None: 5% of examples (at least 1)
    max_new_tokens: int = 128
    max_prompt_tokens: int = 256
    steps: int = 1000
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine (to 10% of lr at the last step)
    positions_per_seq: int = 32
    batch: int = 4  # sequences per optimizer step
    out: str = "ht.safetensors"
    data_dir: str | None = None
    resume: bool = False
    seed: int = 0
    log_every: int = 50
    eval_every: int = 200  # 0: validate at the end only
    checkpoint_every: int = 100
    val_positions: int = 64  # positions per validation sequence (evenly spaced)
    distill_batch: int = 8
    progress: bool = True

    def n_val(self) -> int:
        return self.val_examples if self.val_examples is not None else max(1, round(self.examples * 0.05))

    def validate(self) -> TrainConfig:
        if self.drafter not in KINDS:
            raise TrainError(f"--drafter must be one of {', '.join(KINDS)}, got {self.drafter!r}")
        if self.layer is not None and self.drafter != "ht":
            raise TrainError(f"--layer is for ht only: a {self.drafter} drafter has a fixed layer")
        if self.dtype not in TRAIN_DTYPES:
            raise TrainError(f"--dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.schedule not in ("constant", "cosine"):
            raise TrainError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.k < 1 or self.examples < 1 or self.steps < 0 or self.positions_per_seq < 1 or self.batch < 1:
            raise TrainError("k, examples, positions-per-seq and batch must be >= 1 and steps >= 0")
        if self.lr <= 0:
            raise TrainError(f"lr must be positive, got {self.lr}")
        if self.val_examples is not None and self.val_examples < 0:
            raise TrainError(f"val-examples must be >= 0, got {self.val_examples}")
        return self


def drafter_config(cfg: TrainConfig, n_layers: int) -> PseudoStateConfig:
    """The drafter to train: ht at --layer (default half the layers), medusa at N, pass at 0."""
    layer = {"medusa": n_layers, "pass": 0}.get(cfg.drafter, cfg.layer if cfg.layer is not None else n_layers // 2)
    config = PseudoStateConfig(layer=layer, k=cfg.k, pseudo_attention=cfg.pseudo_attention, kind=cfg.drafter)
    problem = check_layer(config, n_layers)
    if problem:
        raise TrainError(problem)
    return config


def weights_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(weights, summary JSON, resumable checkpoint) for --out: x.safetensors -> x.json, x.ckpt.pt."""
    out = Path(out)
    return out, out.with_suffix(".json"), out.with_suffix(".ckpt.pt")


# --------------------------------------------------------------------------- forward passes


class PrefixKV:
    """Read-only stand-in for a KVCache holding a committed prefix of `length` positions.

    `write(layer, k, v)` returns the stored prefix K/V of that layer followed by the new
    k/v and stores nothing, so any number of pseudo-state batches can attend to the same
    prefix. Holds layers [first_layer, n_layers) only.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], first_layer: int = 0):
        self.k, self.v, self.first_layer = k, v, first_layer
        self.length = k[0].shape[2] if k else 0

    @classmethod
    def from_cache(cls, cache, first_layer: int = 0) -> PrefixKV:
        """Copy the committed K/V of layers [first_layer, ...) out of a KVCache."""
        n = cache.length
        layers = range(first_layer, cache.k.shape[0])
        return cls([cache.k[i, :, :, :n].clone() for i in layers], [cache.v[i, :, :, :n].clone() for i in layers], first_layer)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer < self.first_layer:
            raise ValueError(f"PrefixKV holds layers from {self.first_layer}, not layer {layer}")
        pk, pv = self.k[layer - self.first_layer], self.v[layer - self.first_layer]
        if pk.shape[0] != k.shape[0]:
            pk, pv = pk.expand(k.shape[0], -1, -1, -1), pv.expand(k.shape[0], -1, -1, -1)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)


@dataclass
class Encoded:
    h_layer: torch.Tensor  # (T, dim) hidden state after `layer` layers
    h_final: torch.Tensor  # (T, dim) hidden state after all layers (before the final norm)
    prefix: PrefixKV  # K/V of layers [layer, N) for positions 0..T-1


@torch.no_grad()
def encode_sequence(model: Transformer, ids: list[int], layer: int) -> Encoded:
    """One no_grad pass over the real tokens, all layers through one KV cache."""
    T = len(ids)
    cache = model.new_cache(T)
    ctx = model.context(torch.arange(T, device=model.device), cache)
    h_layer = model.run_layers(model.embed(torch.tensor([ids], device=model.device)), ctx, 0, layer)
    h_final = model.run_layers(h_layer, ctx, layer)
    cache.commit(T)
    return Encoded(h_layer[0], h_final[0], PrefixKV.from_cache(cache, layer))


def pseudo_tree_mask(S: int, k: int, pseudo_attention: bool, device) -> torch.Tensor:
    """(S*k, S*k): block-diagonal over the S groups; lower-triangular blocks with pseudo attention."""
    block = torch.ones(k, k, dtype=torch.bool).tril() if pseudo_attention else torch.eye(k, dtype=torch.bool)
    return torch.block_diag(*[block] * S).to(device)


def draft_logits(model: Transformer, ht: PseudoStateDrafter, enc: Encoded, ts: torch.Tensor) -> torch.Tensor:
    """Draft logits (S, k, vocab), float32, for the positions `ts` (S,); grad flows into ht."""
    k, L = ht.config.k, ht.config.layer
    S, T, device = ts.shape[0], enc.prefix.length, model.device
    pseudo = ht(enc.h_layer[ts])  # (S, k, dim) in the transfer's dtype (float32)
    offsets = torch.arange(1, k + 1, device=device)
    positions = (ts[:, None] + offsets).reshape(-1)
    ctx = model.context(positions, enc.prefix, tree_mask=pseudo_tree_mask(S, k, ht.config.pseudo_attention, device))
    # Pseudo state (t, j) sees the real tokens up to t only, as at inference.
    t_rows = ts.repeat_interleave(k)
    ctx.mask[:, :T] &= torch.arange(T, device=device)[None, :] <= t_rows[:, None]
    h = model.run_layers(pseudo.reshape(1, S * k, -1).to(model.dtype), ctx, L)
    return model.lm_head(model.norm(h[0])).float().reshape(S, k, -1)


@torch.no_grad()
def target_logits(model: Transformer, enc: Encoded, ts: torch.Tensor, k: int) -> torch.Tensor:
    """Target logits (S, k, vocab), float32, at positions t+1..t+k: the distribution of token t+j+1."""
    rows = ts[:, None] + torch.arange(1, k + 1, device=ts.device)
    return model.lm_head(model.norm(enc.h_final[rows])).float()


def kl_loss(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(draft)) per row (..., vocab) -> (...), float32."""
    logp = torch.log_softmax(target.float(), dim=-1)
    logq = torch.log_softmax(draft.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def valid_positions(example: dict, k: int) -> tuple[int, int]:
    """[lo, hi) of positions t that get pseudo states: the last prompt token and the reply, t + k < T."""
    P, T = len(example["prompt_ids"]), len(example["prompt_ids"]) + len(example["reply_ids"])
    return P - 1, T - k


def usable(examples: list[dict], k: int) -> list[dict]:
    out = []
    for e in examples:
        lo, hi = valid_positions(e, k)
        if e["prompt_ids"] and hi > lo:
            out.append(e)
    return out


def sequence_loss(
    model: Transformer, ht: PseudoStateDrafter, example: dict, n_positions: int, generator: torch.Generator
) -> torch.Tensor:
    lo, hi = valid_positions(example, ht.config.k)
    ts = (torch.randperm(hi - lo, generator=generator)[:n_positions] + lo).to(model.device)
    enc = encode_sequence(model, example["prompt_ids"] + example["reply_ids"], ht.config.layer)
    target = target_logits(model, enc, ts, ht.config.k)
    return kl_loss(target, draft_logits(model, ht, enc, ts)).mean()


@torch.no_grad()
def evaluate(model: Transformer, ht: PseudoStateDrafter, examples: list[dict], max_positions: int = 64) -> dict:
    """Validation KL, per-depth top-1/top-5 accuracy vs the target argmax, mean accepted chain."""
    k = ht.config.k
    n, kl_sum = 0, 0.0
    top1, top5, accepted = torch.zeros(k), torch.zeros(k), 0.0
    for e in examples:
        lo, hi = valid_positions(e, k)
        if hi <= lo:
            continue
        count = min(max_positions, hi - lo)
        ts_all = torch.linspace(lo, hi - 1, count).round().long().unique()
        enc = encode_sequence(model, e["prompt_ids"] + e["reply_ids"], ht.config.layer)
        for chunk in ts_all.split(EVAL_CHUNK):
            ts = chunk.to(model.device)
            target = target_logits(model, enc, ts, k)
            draft = draft_logits(model, ht, enc, ts)
            kl_sum += kl_loss(target, draft).mean(-1).sum().item()
            want = target.argmax(-1, keepdim=True)  # (S, k, 1)
            hit1 = (draft.argmax(-1, keepdim=True) == want).squeeze(-1).cpu()
            hit5 = (draft.topk(min(5, draft.shape[-1]), dim=-1).indices == want).any(-1).cpu()
            top1 += hit1.float().sum(0)
            top5 += hit5.float().sum(0)
            accepted += hit1.long().cumprod(-1).sum().item()
            n += ts.shape[0]
    if n == 0:
        return {"positions": 0}
    return {
        "positions": n,
        "kl": kl_sum / n,
        "top1": [round(x, 4) for x in (top1 / n).tolist()],
        "top5": [round(x, 4) for x in (top5 / n).tolist()],
        "mean_accepted": round(accepted / n, 4),
    }


def format_eval(m: dict) -> str:
    if not m.get("positions"):
        return "val: no positions"
    pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
    return (
        f"val kl {m['kl']:.4f}  top1% {pct(m['top1'])}  top5% {pct(m['top5'])}  "
        f"accepted {m['mean_accepted']:.3f} ({m['positions']} positions)"
    )


# --------------------------------------------------------------------------- training loop


class Sampler:
    """Sequences in shuffled epochs, from a seeded generator (its state is checkpointed)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.cursor = 0

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.cursor >= self.n:
                self.perm, self.cursor = torch.randperm(self.n, generator=self.generator), 0
            out.append(int(self.perm[self.cursor]))
            self.cursor += 1
        return out


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if cfg.schedule == "constant" or cfg.steps <= 1:
        return cfg.lr
    frac = min(step / (cfg.steps - 1), 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def data_fingerprint(examples: list[dict]) -> str:
    h = hashlib.sha1()
    for e in examples:
        h.update(json.dumps([e.get("id"), len(e["prompt_ids"]), len(e["reply_ids"])]).encode())
    return h.hexdigest()[:12]


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(
    model: Transformer,
    train_examples: list[dict],
    val_examples: list[dict],
    cfg: TrainConfig,
    log=print,
) -> tuple[PseudoStateDrafter, dict]:
    """Train (or resume) the transfer; saves weights, summary JSON and checkpoint; returns both."""
    from tqdm import tqdm

    args = model.args
    ht_config = drafter_config(cfg, args.n_layers)
    layer = ht_config.layer
    train_examples, val_examples = usable(train_examples, cfg.k), usable(val_examples, cfg.k)
    if not train_examples:
        raise TrainError(f"no training example has a reply of at least k={cfg.k} tokens")
    out, summary_path, ckpt_path = weights_paths(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    ht = build(ht_config, args.dim).to(model.device)  # float32 whatever the backbone dtype
    opt = torch.optim.AdamW(ht.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = Sampler(len(train_examples), generator)
    step, elapsed, history, val_history = 0, 0.0, [], []
    fingerprint = data_fingerprint(train_examples)

    if cfg.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["ht_config"] != dataclasses.asdict(ht_config) or state["model"] != model_signature(args):
            raise TrainError(
                f"{ckpt_path} was saved for {state['ht_config']} on {state['model']}; "
                f"this run is {dataclasses.asdict(ht_config)} on {model_signature(args)}"
            )
        if state["data"] != fingerprint:
            log(f"[train-ht] warning: the training examples differ from those of {ckpt_path}")
        ht.load_state_dict(state["drafter"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if state["data"] == fingerprint:
            sampler.perm, sampler.cursor = state["perm"], state["cursor"]
        step, elapsed = state["step"], state["elapsed"]
        history, val_history = state["history"], state["val_history"]
        log(f"[train-ht] resumed from {ckpt_path} at step {step}")
    elif cfg.resume:
        log(f"[train-ht] no checkpoint {ckpt_path}; starting from step 0")

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "drafter": {name: t.detach().cpu() for name, t in ht.state_dict().items()},
                "optimizer": opt.state_dict(),
                "generator": generator.get_state(),
                "perm": sampler.perm,
                "cursor": sampler.cursor,
                "step": step,
                "elapsed": elapsed,
                "history": history,
                "val_history": val_history,
                "ht_config": dataclasses.asdict(ht_config),
                "model": model_signature(args),
                "data": fingerprint,
            },
        )

    log(
        f"[train-ht] {ht_config.kind} drafter ({ht.parameter_count():,} parameters), layer {layer}/{args.n_layers}, "
        f"k {cfg.k}, pseudo attention {cfg.pseudo_attention}; "
        f"{len(train_examples)} training / {len(val_examples)} validation sequences; "
        f"{cfg.steps} steps of {cfg.batch} x {cfg.positions_per_seq} positions"
    )
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="train-ht", unit="step", disable=not cfg.progress)
    say = bar.write if cfg.progress else log  # log lines above the bar while it shows
    window: list[float] = []
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for idx in sampler.take(cfg.batch):
                loss = sequence_loss(model, ht, train_examples[idx], cfg.positions_per_seq, generator)
                (loss / cfg.batch).backward()
                total += loss.item()
            loss_value = total / cfg.batch
            if not math.isfinite(loss_value):
                raise TrainError(f"the loss is {loss_value} at step {step + 1}; try a lower --lr")
            opt.step()
            step += 1
            history.append(round(loss_value, 6))
            window.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean = sum(window) / len(window)
                say(f"[train-ht] step {step}/{cfg.steps}  loss {mean:.4f}  lr {learning_rate(cfg, step - 1):.2e}")
                window = []
            if val_examples and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                metrics = evaluate(model, ht, val_examples, cfg.val_positions)
                val_history.append({"step": step, **metrics})
                say(f"[train-ht] step {step}  {format_eval(metrics)}")
            elapsed += time.perf_counter() - t0
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
    finally:
        bar.close()

    t0 = time.perf_counter()
    final = evaluate(model, ht, val_examples, cfg.val_positions) if val_examples else {"positions": 0}
    elapsed += time.perf_counter() - t0
    if not val_history or val_history[-1]["step"] != step:
        val_history.append({"step": step, **final})
    log(f"[train-ht] final ({step} steps, {elapsed:.0f}s)  {format_eval(final)}")
    checkpoint()

    tail = history[-max(1, min(len(history), cfg.log_every)) :]
    summary = {
        "config": dataclasses.asdict(ht_config),
        "model": model_signature(args),
        "checkpoint": cfg.checkpoint,
        "dtype": cfg.dtype,
        "parameters": ht.parameter_count(),
        "steps": step,
        "time_s": round(elapsed, 1),
        "examples": {
            "train": len(train_examples),
            "val": len(val_examples),
            "train_reply_tokens": sum(len(e["reply_ids"]) for e in train_examples),
        },
        "training": {
            k: getattr(cfg, k)
            for k in (
                "lr", "weight_decay", "schedule", "positions_per_seq", "batch", "seed", "max_new_tokens", "max_prompt_tokens"
            )
        },
        "final_train_loss": round(sum(tail) / len(tail), 6) if tail else None,
        "val": final,
        "val_history": val_history,
        "loss_history": history,
    }
    short = {k: v for k, v in summary.items() if k not in ("val_history", "loss_history", "config", "model")}
    ht.save(out, args, extra={"training": short})
    summary_path.write_text(json.dumps(summary, indent=1))
    log(f"[train-ht] wrote {out} and {summary_path} (resumable checkpoint: {ckpt_path})")
    return ht, summary


# --------------------------------------------------------------------------- end to end


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: TrainConfig, log=print) -> dict:
    """`leapfrog train-ht`: load the model, distil the data (cached), train, save."""
    from runtime.config import DTYPES
    from runtime.distill import DistillSettings, distill
    from workers.loading import load_model

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model, folder = load_model(cfg.checkpoint, DTYPES[cfg.dtype], device)
    drafter_config(cfg, model.args.n_layers)  # fail before distilling
    settings = DistillSettings(cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.dtype)
    common = dict(settings=settings, data_dir=cfg.data_dir, batch_size=cfg.distill_batch, device=device, progress=cfg.progress)
    train_examples = distill(folder, cfg.examples, "train", **common)
    val_examples = distill(folder, cfg.n_val(), "val", **common) if cfg.n_val() else []
    if len(train_examples) < cfg.examples:
        log(f"[train-ht] only {len(train_examples)} training prompts fit; using them all")
    _, summary = train(model, train_examples, val_examples, cfg, log=log)
    return summary

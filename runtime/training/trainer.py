"""Train pseudo-state drafters by distillation (`leapfrog train --drafter ht|medusa|pass`).

`run` loads the model, builds the data (runtime.training.distill, cached: ShareGPT
training prompts with the model's own greedy replies, `--data self`, or with ShareGPT's
replies, `--data sharegpt`; validation always uses the model's own replies, the text
decoding drafts for) and trains; `train` is the optimisation:
AdamW on the drafter's parameters only (the backbone is frozen) with the loss of
runtime.training.objective, sequences in seeded shuffled epochs, a cosine or constant
learning rate, validation every `eval_every` steps, and a checkpoint every
`checkpoint_every` steps that `--resume` continues from (same order of sequences, same
optimizer state). It writes the weights (a .safetensors file that
workers.drafters.loading reads), a JSON summary beside them and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from configs.training import TrainConfig, TrainError
from runtime.training.objective import evaluate, format_eval, pack_loss, usable
from workers.drafters.loading import build, load
from workers.drafters.pseudo_states import PseudoStateConfig, PseudoStateDrafter, check_layer, model_signature
from workers.model import Transformer


def drafter_config(cfg: TrainConfig, n_layers: int) -> PseudoStateConfig:
    """The drafter to train: ht at --layer (default half the layers), medusa at N, pass at 0."""
    layer = {"medusa": n_layers, "pass": 0}.get(cfg.drafter, cfg.layer if cfg.layer is not None else n_layers // 2)
    config = PseudoStateConfig(layer=layer, k=cfg.k, pseudo_attention=cfg.pseudo_attention, kind=cfg.drafter,
                               refine_layers=tuple(cfg.refine_layers))
    problem = check_layer(config, n_layers)
    if problem:
        raise TrainError(problem)
    return config


def start_from(ht: PseudoStateDrafter, path: str, args, log) -> list[str]:
    """Copy the parameters of the drafter in `path` into `ht` (same kind, layer, k and
    pseudo attention); parameters it lacks (refine maps) keep their fresh start.
    Returns the names of those copied."""
    init = load(path, args)
    a, b = init.config, ht.config
    if (a.kind, a.layer, a.k, a.pseudo_attention) != (b.kind, b.layer, b.k, b.pseudo_attention):
        raise TrainError(f"--init {path} holds {a}; it must match {b} in kind, layer, k and pseudo attention")
    source, copied = dict(init.named_parameters()), []
    for name, p in ht.named_parameters():
        if name in source:
            p.data.copy_(source[name].data)
            copied.append(name)
    log(f"[train] started from {path} ({', '.join(copied)})")
    return copied


def weights_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(weights, summary JSON, resumable checkpoint) for --out: x.safetensors -> x.json, x.ckpt.pt."""
    out = Path(out)
    return out, out.with_suffix(".json"), out.with_suffix(".ckpt.pt")


class SequenceOrder:
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
    """Train (or resume) the drafter; saves weights, summary JSON and checkpoint; returns both."""
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
    inherited = start_from(ht, cfg.init, args, log) if cfg.init else []  # a checkpoint to resume replaces them
    frozen = inherited if cfg.freeze_init else []
    for name, p in ht.named_parameters():
        p.requires_grad_(name not in frozen)
    if frozen:
        if len(frozen) == len(list(ht.parameters())):
            raise TrainError(f"--freeze-init: {cfg.init} holds every parameter of this drafter; nothing would learn")
        log(f"[train] kept fixed: {', '.join(frozen)}")
    opt = torch.optim.AdamW([p for p in ht.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = SequenceOrder(len(train_examples), generator)
    step, elapsed, history, val_history = 0, 0.0, [], []
    fingerprint = data_fingerprint(train_examples)

    if cfg.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["ht_config"] != dataclasses.asdict(ht_config) or state["model"] != model_signature(args):
            raise TrainError(
                f"{ckpt_path} was saved for {state['ht_config']} on {state['model']}; "
                f"this run is {dataclasses.asdict(ht_config)} on {model_signature(args)}"
            )
        if state.get("frozen", []) != frozen:
            raise TrainError(f"{ckpt_path} was saved with {state.get('frozen', [])} kept fixed; this run keeps {frozen}")
        if state["data"] != fingerprint:
            log(f"[train] warning: the training examples differ from those of {ckpt_path}")
        ht.load_state_dict(state["drafter"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if state["data"] == fingerprint:
            sampler.perm, sampler.cursor = state["perm"], state["cursor"]
        step, elapsed = state["step"], state["elapsed"]
        history, val_history = state["history"], state["val_history"]
        log(f"[train] resumed from {ckpt_path} at step {step}")
    elif cfg.resume:
        log(f"[train] no checkpoint {ckpt_path}; starting from step 0")

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
                "frozen": frozen,
            },
        )

    log(
        f"[train] {ht_config.kind} drafter ({ht.parameter_count():,} parameters), layer {layer}/{args.n_layers}, "
        f"k {cfg.k}, pseudo attention {cfg.pseudo_attention}; "
        f"{len(train_examples)} training / {len(val_examples)} validation sequences; "
        f"{cfg.steps} steps of {cfg.batch} x {cfg.positions_per_seq} positions, {cfg.pack} sequence(s) a forward"
    )
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), desc="train", unit="step", disable=not cfg.progress)
    say = bar.write if cfg.progress else log  # log lines above the bar while it shows
    window: list[float] = []
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            taken = sampler.take(cfg.batch)
            for start in range(0, cfg.batch, cfg.pack):  # `pack` sequences share a forward
                group = [train_examples[i] for i in taken[start : start + cfg.pack]]
                loss = pack_loss(model, ht, group, cfg.positions_per_seq, generator)
                (loss * len(group) / cfg.batch).backward()
                total += loss.item() * len(group)
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
                say(f"[train] step {step}/{cfg.steps}  loss {mean:.4f}  lr {learning_rate(cfg, step - 1):.2e}")
                window = []
            if val_examples and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                metrics = evaluate(model, ht, val_examples, cfg.val_positions)
                val_history.append({"step": step, **metrics})
                say(f"[train] step {step}  {format_eval(metrics)}")
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
    log(f"[train] final ({step} steps, {elapsed:.0f}s)  {format_eval(final)}")
    checkpoint()

    tail = history[-max(1, min(len(history), cfg.log_every)) :]
    summary = {
        "config": dataclasses.asdict(ht_config),
        "model": model_signature(args),
        "checkpoint": cfg.checkpoint,
        "dtype": cfg.dtype,
        "distill_dtype": cfg.distill_dtype or cfg.dtype,
        "parameters": ht.parameter_count(),
        "frozen": frozen,  # the --init parameters kept fixed (--freeze-init)
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
                "data", "lr", "weight_decay", "schedule", "positions_per_seq", "batch", "pack", "seed", "max_new_tokens",
                "val_max_new_tokens", "max_prompt_tokens",
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
    log(f"[train] wrote {out} and {summary_path} (resumable checkpoint: {ckpt_path})")
    return ht, summary

"""The one training loop of every trained drafter (`leapfrog train`).

What differs between drafters is a TrainingTask (runtime.training.trainer: the
pseudo-state drafters ht, medusa and pass; runtime.training.eagle_trainer: the EAGLE
peer): its trainable parameters, its loss, its validation, what its checkpoint holds
besides the loop's state, its summary and weights file, and a few LoopSettings. The loop
does the rest, once:

  optimizer   AdamW on the task's parameters (the backbone is frozen)
  order       the training examples in seeded shuffled epochs (SequenceOrder); each step
              takes `batch` of them, `micro_batch` a forward and backward
  loss        the task's summed loss over the step's counted targets, divided by their
              count: the gradients of the micro-batches add up, then are divided once
  schedule    cosine (to 10% of lr at the last step) or constant (learning_rate)
  validation  every `eval_every` steps before the last, once at the end, and (a setting)
              before the first step
  checkpoint  every `checkpoint_every` steps and at the end, to OUT.ckpt.pt; `--resume`
              continues from it: the same weights, optimizer state, order of examples and
              generator, as if the run had never stopped
  output      OUT (the task's weights file) and OUT.json (the task's summary)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from tqdm import tqdm

from configs.training import TrainConfig, TrainError


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


def save_checkpoint(path: Path, state) -> None:
    """torch.save through a temporary file: a stop mid-write leaves the last whole file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


@dataclass
class LoopSettings:
    """Where drafters train differently: settings of their task, not branches of the loop."""

    tag: str  # the log prefix and progress bar name: "train", "eagle"
    micro_batch: int  # examples a forward and backward (`batch` of them a step)
    clip_grad_norm: float | None = None  # clip the gradient to this norm before each step; None: never
    validate_first: bool = False  # also validate before the first step (the starting weights' score)
    time_validation: bool = True  # validation counts in the run's time (elapsed, time_s)
    loss_history: Literal["step", "log"] = "step"  # "step": every step's loss, rounded; "log": {step, loss, elapsed_s} a log line


@dataclass
class Progress:
    """The loop's state besides the optimizer's and the order's (all of it is checkpointed)."""

    step: int = 0
    elapsed: float = 0.0  # seconds of training so far, across resumes
    history: list = field(default_factory=list)  # losses, as LoopSettings.loss_history says
    val_history: list[dict] = field(default_factory=list)  # {"step": s, **metrics} per validation


class TrainingTask(Protocol):
    """One drafter's training, as the loop sees it."""

    settings: LoopSettings
    examples: list[dict]  # the training examples; the loop draws indices into them

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that learn."""

    def loss(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """The loss of these training examples, summed over its counted targets, and their count."""

    def validate(self) -> dict | None:
        """Validation metrics of the current weights; None without validation data."""

    def describe(self, metrics: dict) -> str:
        """The metrics of `validate` in one line."""

    def started(self) -> str:
        """The log line that opens the run, once the weights are in place (fresh, --init or resumed)."""

    def checkpoint_state(self) -> dict:
        """The task's entries of the checkpoint: its weights and what they were built for."""

    def restore(self, state: dict, path: Path) -> None:
        """Load the task's entries of a checkpoint; a TrainError if it does not fit this run."""

    def summary(self, progress: Progress, final: dict | None) -> dict:
        """The run's JSON summary."""

    def save(self, path: Path, summary: dict) -> None:
        """Write the weights file (with a short form of the summary in its metadata)."""


def train_loop(task: TrainingTask, cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) the task's parameters; saves weights, summary JSON and checkpoint; returns the summary."""
    s = task.settings
    out, summary_path, ckpt_path = weights_paths(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = task.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # the order of examples and the task's draws
    order = SequenceOrder(len(task.examples), generator)
    fingerprint = data_fingerprint(task.examples)
    p = Progress()

    if cfg.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        task.restore(state, ckpt_path)
        same_data = state.get("data", fingerprint) == fingerprint  # older eagle checkpoints have no "data"
        if not same_data:
            log(f"[{s.tag}] warning: the training examples differ from those of {ckpt_path}")
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if same_data:  # other examples keep the fresh order drawn above
            order.perm, order.cursor = state["perm"], state["cursor"]
        p = Progress(state["step"], state["elapsed"], state["history"], state["val_history"])
        log(f"[{s.tag}] resumed from {ckpt_path} at step {p.step}")
    elif cfg.resume:
        log(f"[{s.tag}] no checkpoint {ckpt_path}; starting from step 0")
    log(task.started())

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            **task.checkpoint_state(), "optimizer": opt.state_dict(), "generator": generator.get_state(),
            "perm": order.perm, "cursor": order.cursor, "step": p.step, "elapsed": p.elapsed, "history": p.history,
            "val_history": p.val_history, "data": fingerprint,
        })  # fmt: skip

    def validate() -> dict | None:
        t0 = time.perf_counter()
        metrics = task.validate()
        if s.time_validation:
            p.elapsed += time.perf_counter() - t0
        if metrics is not None:
            p.val_history.append({"step": p.step, **metrics})
        return metrics

    bar = tqdm(total=cfg.steps, initial=min(p.step, cfg.steps), desc=s.tag, unit="step", disable=not cfg.progress)
    say = bar.write if cfg.progress else log  # log lines above the bar while it shows
    if s.validate_first and p.step == 0 and not p.val_history and (metrics := validate()) is not None:
        say(f"[{s.tag}] step 0  {task.describe(metrics)}")
    window: list[float] = []  # the losses since the last log line
    try:
        while p.step < cfg.steps:
            t0 = time.perf_counter()
            loss = optimizer_step(task, opt, params, order, generator, cfg, p.step)
            p.step += 1
            p.elapsed += time.perf_counter() - t0
            window.append(loss)
            if s.loss_history == "step":
                p.history.append(round(loss, 6))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if p.step % cfg.log_every == 0 or p.step == cfg.steps:
                mean = sum(window) / len(window)
                if s.loss_history == "log":
                    p.history.append({"step": p.step, "loss": mean, "elapsed_s": p.elapsed})
                say(f"[{s.tag}] step {p.step}/{cfg.steps}  loss {mean:.4f}  lr {learning_rate(cfg, p.step - 1):.2e}  "
                    f"({p.elapsed:.0f} s)")
                window = []
            if cfg.eval_every and p.step % cfg.eval_every == 0 and p.step < cfg.steps:
                if (metrics := validate()) is not None:
                    say(f"[{s.tag}] step {p.step}  {task.describe(metrics)}")
            if p.step % cfg.checkpoint_every == 0 and p.step < cfg.steps:
                checkpoint()
    finally:
        bar.close()

    if p.val_history and p.val_history[-1]["step"] == p.step:  # validated at this step already (steps 0, a resume)
        final = {k: v for k, v in p.val_history[-1].items() if k != "step"}
    else:
        final = validate()
    scores = task.describe(final) if final is not None else "no validation data"
    log(f"[{s.tag}] final ({p.step} steps, {p.elapsed:.0f}s)  {scores}")
    checkpoint()
    summary = task.summary(p, final)
    task.save(out, summary)
    summary_path.write_text(json.dumps(summary, indent=1))
    log(f"[{s.tag}] wrote {out} and {summary_path} (resumable checkpoint: {ckpt_path})")
    return summary


def optimizer_step(task: TrainingTask, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   order: SequenceOrder, generator: torch.Generator, cfg: TrainConfig, step: int) -> float:
    """One step on `batch` training examples, `micro_batch` a forward and backward; returns its loss."""
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    opt.zero_grad(set_to_none=True)
    chosen = order.take(cfg.batch)
    total, count = 0.0, 0
    for start in range(0, cfg.batch, task.settings.micro_batch):
        summed, n = task.loss(chosen[start : start + task.settings.micro_batch], generator)
        summed.backward()  # gradients add up over the micro-batches ...
        total, count = total + summed.item(), count + n
    count = max(count, 1)
    for param in params:  # ... into those of the mean over the step's counted targets
        if param.grad is not None:
            param.grad.div_(count)
    loss = total / count
    if not math.isfinite(loss):
        raise TrainError(f"the loss is {loss} at step {step + 1}; try a lower --lr")
    if task.settings.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, task.settings.clip_grad_norm)
    opt.step()
    return loss

"""Train pseudo-state drafters by distillation (`leapfrog train --drafter ht|medusa|pass`).

runtime.training.command loads the model and builds the data (runtime.training.distill,
cached: ShareGPT training prompts with the model's own greedy replies, `--data self`, or
with ShareGPT's replies, `--data sharegpt`; validation always uses the model's own
replies, the text decoding drafts for). Here is what these drafters bring to the one
training loop (runtime.training.loop): the drafter to train (`drafter_config`, maybe
started from --init weights, some of them kept fixed), the loss of
runtime.training.objective on the drafter's parameters only (the backbone is frozen), its
validation, its checkpoint entries and its summary. It writes the weights (a
.safetensors file that workers.drafters.loading reads), a JSON summary beside them and
the checkpoint that `--resume` continues from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from configs.training import TrainConfig, TrainError
from runtime.training.loop import LoopSettings, Progress, train_loop
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


class PseudoStateTask:
    """The training of a pseudo-state drafter as runtime.training.loop sees it: the loss of
    runtime.training.objective (each sequence weighs the same; `pack` of them a forward),
    validation every `eval_every` steps and at the end (counted in the run's time), no
    gradient clipping, every step's loss in the summary."""

    def __init__(self, model: Transformer, train_examples: list[dict], val_examples: list[dict], cfg: TrainConfig, log):
        args = model.args
        self.model, self.cfg, self.config = model, cfg, drafter_config(cfg, args.n_layers)
        self.examples, self.val_examples = usable(train_examples, cfg.k), usable(val_examples, cfg.k)
        if not self.examples:
            raise TrainError(f"no training example has a reply of at least k={cfg.k} tokens")
        self.settings = LoopSettings(tag="train", micro_batch=cfg.pack)
        model.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.ht = build(self.config, args.dim).to(model.device)  # float32 whatever the backbone dtype
        inherited = start_from(self.ht, cfg.init, args, log) if cfg.init else []  # a checkpoint to resume replaces them
        self.frozen = inherited if cfg.freeze_init else []
        for name, p in self.ht.named_parameters():
            p.requires_grad_(name not in self.frozen)
        if self.frozen:
            if len(self.frozen) == len(list(self.ht.parameters())):
                raise TrainError(f"--freeze-init: {cfg.init} holds every parameter of this drafter; nothing would learn")
            log(f"[train] kept fixed: {', '.join(self.frozen)}")

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.ht.parameters() if p.requires_grad]

    def loss(self, indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        group = [self.examples[i] for i in indices]  # packed into one forward
        return pack_loss(self.model, self.ht, group, self.cfg.positions_per_seq, generator) * len(group), len(group)

    def validate(self) -> dict | None:
        return evaluate(self.model, self.ht, self.val_examples, self.cfg.val_positions) if self.val_examples else None

    def describe(self, metrics: dict) -> str:
        return format_eval(metrics)

    def started(self) -> str:
        cfg, args = self.cfg, self.model.args
        return (
            f"[train] {self.config.kind} drafter ({self.ht.parameter_count():,} parameters), "
            f"layer {self.config.layer}/{args.n_layers}, k {cfg.k}, pseudo attention {cfg.pseudo_attention}; "
            f"{len(self.examples)} training / {len(self.val_examples)} validation sequences; "
            f"{cfg.steps} steps of {cfg.batch} x {cfg.positions_per_seq} positions, {cfg.pack} sequence(s) a forward"
        )

    def checkpoint_state(self) -> dict:
        return {
            "drafter": {name: t.detach().cpu() for name, t in self.ht.state_dict().items()},
            "ht_config": dataclasses.asdict(self.config),
            "model": model_signature(self.model.args),
            "frozen": self.frozen,
        }

    def restore(self, state: dict, path: Path) -> None:
        config, model = dataclasses.asdict(self.config), model_signature(self.model.args)
        if (state["ht_config"], state["model"]) != (config, model):
            raise TrainError(f"{path} was saved for {state['ht_config']} on {state['model']}; this run is {config} on {model}")
        if state.get("frozen", []) != self.frozen:
            raise TrainError(f"{path} was saved with {state.get('frozen', [])} kept fixed; this run keeps {self.frozen}")
        self.ht.load_state_dict(state["drafter"])

    def summary(self, progress: Progress, final: dict | None) -> dict:
        cfg, history = self.cfg, progress.history
        tail = history[-max(1, min(len(history), cfg.log_every)) :]  # the losses of the last log line
        return {
            "config": dataclasses.asdict(self.config),
            "model": model_signature(self.model.args),
            "checkpoint": cfg.checkpoint,
            "dtype": cfg.dtype,
            "distill_dtype": cfg.distill_dtype or cfg.dtype,
            "parameters": self.ht.parameter_count(),
            "frozen": self.frozen,  # the --init parameters kept fixed (--freeze-init)
            "steps": progress.step,
            "time_s": round(progress.elapsed, 1),
            "examples": {
                "train": len(self.examples),
                "val": len(self.val_examples),
                "train_reply_tokens": sum(len(e["reply_ids"]) for e in self.examples),
            },
            "training": {
                k: getattr(cfg, k)
                for k in (
                    "data", "lr", "weight_decay", "schedule", "positions_per_seq", "batch", "pack", "seed",
                    "max_new_tokens", "val_max_new_tokens", "max_prompt_tokens",
                )
            },
            "final_train_loss": round(sum(tail) / len(tail), 6) if tail else None,
            "val": final if final is not None else {"positions": 0},
            "val_history": progress.val_history,
            "loss_history": history,
        }

    def save(self, path: Path, summary: dict) -> None:
        short = {k: v for k, v in summary.items() if k not in ("val_history", "loss_history", "config", "model")}
        self.ht.save(path, self.model.args, extra={"training": short})


def train(
    model: Transformer,
    train_examples: list[dict],
    val_examples: list[dict],
    cfg: TrainConfig,
    log=print,
) -> tuple[PseudoStateDrafter, dict]:
    """Train (or resume) the drafter; saves weights, summary JSON and checkpoint; returns both."""
    task = PseudoStateTask(model, train_examples, val_examples, cfg, log)
    summary = train_loop(task, cfg, log)
    return task.ht, summary

"""`leapfrog train`: the settings of one drafter training run (runtime.training.loop)."""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import DRAFTER_KINDS

TRAIN_DTYPES = ("float32", "bfloat16")
TRAIN_DRAFTERS = (*DRAFTER_KINDS, "eagle")  # the pseudo-state kinds and the EAGLE peer (runtime.training.eagle_trainer)


class TrainError(ValueError):
    """A training setup that cannot work, with the reason in words."""


@dataclass
class TrainConfig:
    checkpoint: str = "default"
    dtype: str = "float32"  # backbone dtype; the transfer and the loss stay float32
    distill_dtype: str | None = None  # dtype of the model that generates the "self" replies; None: dtype
    device: str = "auto"
    threads: int = 2
    drafter: str = "ht"  # ht | medusa | pass (workers.drafters.pseudo_states) | eagle (workers.drafters.eagle)
    layer: int | None = None  # ht only; None: half the layers
    refine_layers: tuple[int, ...] = ()  # ht only: later layers that transfer again (FIRP style)
    init: str | None = None  # start from these weights (same kind, layer and k); new parameters start fresh
    freeze_init: bool = False  # the --init weights stay fixed: only the parameters they lack learn
    k: int = 3
    pseudo_attention: bool = True
    data: str = "self"  # training replies: "self" (the model's greedy replies) | "sharegpt" (ShareGPT's own)
    examples: int = 1000  # training examples
    val_examples: int | None = None  # None: 5% of examples (at least 1)
    max_new_tokens: int = 128  # reply length of the training examples
    val_max_new_tokens: int = 128  # reply length of the validation examples (the model's own replies)
    max_prompt_tokens: int = 256
    steps: int = 1000
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine (to 10% of lr at the last step)
    positions_per_seq: int = 32
    batch: int = 4  # sequences per optimizer step
    pack: int = 1  # sequences packed into one forward (runtime.training.objective.pack_loss): >1 for a GPU
    out: str = "ht.safetensors"
    data_dir: str | None = None
    resume: bool = False
    seed: int = 0
    log_every: int = 50
    eval_every: int = 200  # 0: validate at the end only
    checkpoint_every: int = 100
    val_positions: int = 64  # positions per validation sequence (evenly spaced)
    distill_batch: int = 8
    data_only: bool = False  # build (or extend) the cached data set and stop: no training
    progress: bool = True
    vocab: int = 8192  # eagle only: draft vocabulary (the most frequent reply tokens)
    unroll: int = 1  # eagle only: 2 also trains depth 2 on the draft model's own predicted features

    def n_val(self) -> int:
        return self.val_examples if self.val_examples is not None else max(1, round(self.examples * 0.05))

    def validate(self) -> TrainConfig:
        if self.drafter not in TRAIN_DRAFTERS:
            raise TrainError(f"--drafter must be one of {', '.join(TRAIN_DRAFTERS)}, got {self.drafter!r}")
        if self.drafter == "eagle" and (self.k != 3 or self.refine_layers or self.pack != 1):
            raise TrainError("--k, --refine-layers and --pack are for the pseudo-state drafters, not eagle")
        if self.freeze_init and not self.init:
            raise TrainError("--freeze-init needs --init: the weights to keep fixed")
        if self.unroll not in (1, 2) or (self.unroll != 1 and self.drafter != "eagle"):
            raise TrainError(f"--unroll is 1 or 2, for eagle only; got {self.unroll} for {self.drafter}")
        if self.vocab < 1:
            raise TrainError(f"--vocab must be >= 1, got {self.vocab}")
        if self.layer is not None and self.drafter != "ht":
            raise TrainError(f"--layer is for ht only: a {self.drafter} drafter has a fixed layer")
        for name, value in (("--dtype", self.dtype), ("--distill-dtype", self.distill_dtype or self.dtype)):
            if value not in TRAIN_DTYPES:
                raise TrainError(f"{name} must be one of {', '.join(TRAIN_DTYPES)}, got {value!r}")
        if self.data not in ("self", "sharegpt"):
            raise TrainError(f"--data must be self or sharegpt, got {self.data!r}")
        if self.schedule not in ("constant", "cosine"):
            raise TrainError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.k < 1 or self.examples < 1 or self.steps < 0 or self.positions_per_seq < 1 or self.batch < 1:
            raise TrainError("k, examples, positions-per-seq and batch must be >= 1 and steps >= 0")
        if not 1 <= self.pack <= self.batch:
            raise TrainError(f"pack must be between 1 and batch ({self.batch}), got {self.pack}")
        if self.lr <= 0:
            raise TrainError(f"lr must be positive, got {self.lr}")
        if self.val_examples is not None and self.val_examples < 0:
            raise TrainError(f"val-examples must be >= 0, got {self.val_examples}")
        return self

"""Drafters that draft inside the verifying forward pass from pseudo hidden states.

Three methods share one shape. After `layer` decoder layers, a small module maps the
hidden state h of the token at position t to k pseudo states for positions t+1..t+k;
they run through the remaining layers with the real tokens (pseudo state j attending to
the real context and, with `pseudo_attention`, to pseudo states < j), and the final
norm and the frozen LM head read from pseudo state j a draft of the token at t+j+1:

    kind     layer L     pseudo state j                  parameters
    ht       0 < L < N   W_j h                           k * dim^2   (hidden transfer)
    medusa   N           h + SiLU(W_j h + b_j)           k * (dim^2 + dim)   (Medusa-1 heads)
    pass     0           e_j, whatever the token          k * dim     (PaSS look-ahead embeddings)

Medusa's heads sit after the last layer, so nothing follows them but the norm and LM
head; PaSS's embeddings enter before the first, so they see the whole model. One
forward (workers.drafters.pseudo_forward) serves all three: the decoder
(runtime.decoding.speculative), the pipeline's worker (workers.decode_worker)
and training (runtime.training).

Hidden transfer may also transfer again at later layers (FIRP style, `refine_layers`
R_1 < R_2 < ...): at R_i each pseudo state gets U_ij h_(R_i) added, the drafting token's
hidden state at that layer through one more learned map per position, so the drafts
see the real token's deeper features too.

Weights are safetensors with the config and the target model's shape in the metadata,
so a file for another model, or of another kind, is caught on load
(workers.drafters.loading).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from configs.schema import DRAFTER_KINDS as KINDS
from workers.model import ModelArgs

METADATA_KEY = "leapfrog.hidden_transfer"  # the key of the first (ht-only) files, kept for all kinds


@dataclass(frozen=True)
class PseudoStateConfig:
    layer: int  # decoder layers run before the pseudo states join
    k: int  # pseudo positions (draft depth beyond the bonus token)
    pseudo_attention: bool = True  # pseudo state j attends to pseudo states < j
    kind: str = "ht"
    refine_layers: tuple[int, ...] = ()  # ht only: later layers that transfer again (FIRP style)


def check_layer(config: PseudoStateConfig, n_layers: int) -> str | None:
    """Why `config` does not fit an n_layers model (None when it does)."""
    if config.kind not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {config.kind!r}"
    if config.k < 1:
        return f"k must be >= 1, got {config.k}"
    want = {"medusa": (n_layers, n_layers), "pass": (0, 0)}.get(config.kind, (1, n_layers - 1))
    if not want[0] <= config.layer <= want[1]:
        return f"a {config.kind} drafter needs layer in {want[0]}..{want[1]} of this {n_layers}-layer model, got {config.layer}"
    refine = config.refine_layers
    if refine and config.kind != "ht":
        return f"refine layers are for ht only, not {config.kind}"
    if list(refine) != sorted(set(refine)) or any(not config.layer < r < n_layers for r in refine):
        return f"refine layers must increase strictly within {config.layer + 1}..{n_layers - 1}, got {list(refine)}"
    return None


class PseudoStateDrafter(nn.Module):
    """Base of the three kinds: every parameter has the k pseudo positions as dimension 0."""

    def __init__(self, config: PseudoStateConfig):
        super().__init__()
        self.config = config
        self.training_summary: dict = {}  # how the weights were trained, from the file (time_s, steps, ...)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., dim) -> pseudo states (..., k, dim)."""
        raise NotImplementedError

    def first(self, k: int) -> PseudoStateDrafter:
        """The first k pseudo positions only (k <= config.k): pseudo state j never attends to
        states > j, so these drafts equal the full module's first k."""
        if not 1 <= k <= self.config.k:
            raise ValueError(f"k must be in 1..{self.config.k}, got {k}")
        dim = next(self.parameters()).shape[-1]
        module = type(self)(replace(self.config, k=k), dim)
        for name, p in module.named_parameters():
            p.data = dict(self.named_parameters())[name].data[:k].clone()
        return module.to(next(self.parameters()).device)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path, args: ModelArgs, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"config": asdict(self.config), "model": model_signature(args), **(extra or {})}
        tensors = {name: p.detach().float().contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def model_signature(args: ModelArgs) -> dict:
    return {"architecture": args.architecture, "dim": args.dim, "n_layers": args.n_layers, "vocab_size": args.vocab_size}

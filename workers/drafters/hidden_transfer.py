"""Hidden transfer: learned linear maps from one hidden state to k pseudo hidden states.

After `layer` decoder layers, the hidden state h of the last accepted token (position t)
is mapped by W_1..W_k to pseudo states W_j h for positions t+1..t+k. They join the
sequence there and run through the remaining layers with the real tokens (pseudo state j
attending to the real context and, with `pseudo_attention`, to pseudo states < j); the LM
head then reads from pseudo state j a draft of the token at t+j+1.

Weights are saved as safetensors with the config and the target model's shape in the
metadata, so a mismatch with the model is caught on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from workers.model import ModelArgs


# Weights shipped for the default model (SmolLM2-135M-Instruct).
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "smollm2-135m-ht.safetensors"


class DrafterWeightsError(ValueError):
    pass


def default_weights_path(checkpoint: str) -> Path:
    if checkpoint != "default":
        raise DrafterWeightsError(
            "no hidden-transfer weights ship for this checkpoint: train them with `leapfrog train-ht` "
            "and set [ht] weights (or --ht-weights)"
        )
    return SHIPPED_WEIGHTS


@dataclass(frozen=True)
class HiddenTransferConfig:
    layer: int  # decoder layers run before the transfer; pseudo states join after them
    k: int  # pseudo positions (draft depth beyond the bonus token)
    pseudo_attention: bool = True  # pseudo state j attends to pseudo states < j


class HiddenTransfer(nn.Module):
    def __init__(self, config: HiddenTransferConfig, dim: int):
        super().__init__()
        self.config = config
        # (k, dim, dim); identity start: each pseudo state begins as a copy of h.
        self.transfer = nn.Parameter(torch.eye(dim).repeat(config.k, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., dim) -> pseudo states (..., k, dim)."""
        return torch.einsum("...d,ked->...ke", h.to(self.transfer.dtype), self.transfer)

    def first(self, k: int) -> "HiddenTransfer":
        """The first k maps only (k <= config.k): pseudo state j attends only to states < j,
        so these drafts equal the full module's first k; the forward carries k states."""
        if not 1 <= k <= self.config.k:
            raise ValueError(f"k must be in 1..{self.config.k}, got {k}")
        module = HiddenTransfer(replace(self.config, k=k), self.transfer.shape[-1])
        module.transfer.data = self.transfer.data[:k].clone()
        return module.to(self.transfer.device)

    def save(self, path: str | Path, args: ModelArgs, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"config": asdict(self.config), "model": model_signature(args), **(extra or {})}
        save_file({"transfer": self.transfer.detach().float().contiguous()}, str(path),
                  metadata={"leapfrog.hidden_transfer": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, args: ModelArgs) -> "HiddenTransfer":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DrafterWeightsError(f"hidden-transfer weights {path} do not exist (train them with `leapfrog train-ht`)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["leapfrog.hidden_transfer"])
                transfer = f.get_tensor("transfer")
        except (KeyError, json.JSONDecodeError, OSError, RuntimeError) as e:
            raise DrafterWeightsError(f"{path} is not a Leapfrog hidden-transfer file ({e})") from None
        if meta["model"] != model_signature(args):
            raise DrafterWeightsError(
                f"{path} was trained for a model {meta['model']}, but the loaded model is {model_signature(args)}"
            )
        config = HiddenTransferConfig(**meta["config"])
        if not 0 < config.layer < args.n_layers or transfer.shape != (config.k, args.dim, args.dim):
            raise DrafterWeightsError(f"{path}: config {config} does not fit a {args.n_layers}-layer model")
        module = cls(config, args.dim)
        module.transfer.data.copy_(transfer)
        return module


def model_signature(args: ModelArgs) -> dict:
    return {"architecture": args.architecture, "dim": args.dim, "n_layers": args.n_layers, "vocab_size": args.vocab_size}

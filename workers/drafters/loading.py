"""Pseudo-state drafter weights: a fresh drafter of each kind, the files that hold trained
ones (saved by PseudoStateDrafter.save), the files shipped for the default model, and
the successor priors beside them (workers.drafters.successor_prior)."""

from __future__ import annotations

import json
from pathlib import Path
import torch

from workers.drafters.hidden_transfer import HiddenTransfer
from workers.drafters.lookahead import LookaheadEmbeddings
from workers.drafters.medusa import MedusaHeads
from workers.drafters.successor_prior import SuccessorPrior
from workers.drafters.pseudo_states import METADATA_KEY, PseudoStateConfig, PseudoStateDrafter, check_layer, model_signature
from workers.model import ModelArgs

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped for the default model
DRAFTERS = {"ht": HiddenTransfer, "medusa": MedusaHeads, "pass": LookaheadEmbeddings}


class DrafterWeightsError(ValueError):
    pass


def shipped_weights(checkpoint: str, kind: str) -> Path:
    """The weights of `kind` shipped for the default model (SmolLM2-135M-Instruct)."""
    if checkpoint != "default":
        raise DrafterWeightsError(
            f"no {kind} weights ship for this checkpoint: train them with `leapfrog train --drafter {kind}` "
            f"and set [{kind}] weights in the config"
        )
    return WEIGHTS_DIR / f"smollm2-135m-{kind}.safetensors"


def weights_file(checkpoint: str, kind: str, weights: str) -> Path:
    """The file a [kind] config section's `weights` names: "default" is the shipped one."""
    return shipped_weights(checkpoint, kind) if weights == "default" else Path(weights)


def load_prior(checkpoint: str, kind: str, prior: str, vocab_size: int) -> SuccessorPrior | None:
    """The successor prior a [kind] section's `prior` names: None for "off", and for
    "default" where none ships (only `ht` on the default model has one)."""
    if prior == "off":
        return None
    if prior == "default":
        path = WEIGHTS_DIR / f"smollm2-135m-{kind}-prior.safetensors"
        if checkpoint != "default" or not path.is_file():
            return None
        return SuccessorPrior.load(path, vocab_size)
    return SuccessorPrior.load(prior, vocab_size)


def build(config: PseudoStateConfig, dim: int) -> PseudoStateDrafter:
    """A fresh drafter of config.kind (its training starting point)."""
    return DRAFTERS[config.kind](config, dim)


def read_weights(path: str | Path, metadata_key: str, what: str, train: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata (JSON under `metadata_key`) and tensors of a weights file; a missing file
    or one that is not a Leapfrog `what` file is a DrafterWeightsError (`train`: the command that makes one)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DrafterWeightsError(f"{what} weights {path} do not exist (train them with `{train}`)")
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})[metadata_key]), {name: f.get_tensor(name) for name in f.keys()}
    except (KeyError, json.JSONDecodeError, OSError, RuntimeError) as e:
        raise DrafterWeightsError(f"{path} is not a Leapfrog {what} file ({e})") from None


def read_model_weights(path: str | Path, metadata_key: str, what: str, train: str,
                       signature: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """`read_weights`, and a DrafterWeightsError when the file was trained for a model other
    than `signature` (the loaded model's shape, as the file's kind records it)."""
    meta, tensors = read_weights(path, metadata_key, what, train)
    if meta["model"] != signature:
        raise DrafterWeightsError(f"{path} was trained for a model {meta['model']}, not {signature}")
    return meta, tensors


def load(path: str | Path, args: ModelArgs) -> PseudoStateDrafter:
    """Weights saved by PseudoStateDrafter.save, checked against the loaded model."""
    meta, tensors = read_weights(path, METADATA_KEY, "drafter", "leapfrog train")
    if meta["model"] != model_signature(args):
        raise DrafterWeightsError(
            f"{path} was trained for a model {meta['model']}, but the loaded model is {model_signature(args)}"
        )
    # JSON has lists where the config holds tuples (refine layers)
    fields = {key: tuple(v) if isinstance(v, list) else v for key, v in meta["config"].items()}
    if fields.pop("adapter_layers", ()) or fields.pop("adapter_rank", 0):  # written by versions that had adapters
        raise DrafterWeightsError(f"{path} holds adapters, which this version does not run (they measured no gain)")
    config = PseudoStateConfig(**fields)
    problem = check_layer(config, args.n_layers)
    module = build(config, args.dim) if problem is None else None
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()} if module else {}
    if problem or shapes != {name: tuple(t.shape) for name, t in tensors.items()}:
        raise DrafterWeightsError(f"{path}: config {config} does not fit a {args.n_layers}-layer model ({problem or shapes})")
    for name, p in module.named_parameters():
        p.data.copy_(tensors[name])
    module.training_summary = meta.get("training", {})
    return module

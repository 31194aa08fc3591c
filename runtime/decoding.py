"""Autoregressive decoding as small named functions over the model's parts.

Every decoding mode reports its progress as Steps: the tokens one target forward pass
committed, with the margin of each choice (how close it came to another token, see
runtime.sampling; the benchmark uses it to tell near-tie flips from real errors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from runtime.sampling import Greedy, Sampler
from workers.kv_cache import KVCache
from workers.model import Transformer


@dataclass
class Step:
    tokens: list[int]  # committed by this step, in order
    margins: list[float] | None  # margin of each choice (runtime.sampling; None: not known)
    forward_passes: int = 1  # target-model forward passes the step took


def prefill(model: Transformer, cache: KVCache, prompt_ids: list[int]) -> torch.Tensor:
    """Run the prompt through the model into the cache; return the last position's logits (vocab,)."""
    tokens = torch.tensor([prompt_ids], device=model.device)
    positions = torch.arange(cache.length, cache.length + len(prompt_ids), device=model.device)
    h = model.run_layers(model.embed(tokens), model.context(positions, cache))
    cache.commit(len(prompt_ids))
    return model.lm_head(model.norm(h[0, -1]))


def decode_one(model: Transformer, cache: KVCache, token: int) -> torch.Tensor:
    """Append one token; return the logits (vocab,) for the position after it."""
    tokens = torch.tensor([[token]], device=model.device)
    positions = torch.tensor([cache.length], device=model.device)
    logits = model(tokens, model.context(positions, cache))
    cache.commit(1)
    return logits[0, -1]


@torch.inference_mode()
def generate_ar(
    model: Transformer,
    cache: KVCache,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: set[int],
    choose: Greedy | Sampler | None = None,
) -> Iterator[Step]:
    """Plain decoding: one forward pass, one token (greedy unless `choose` samples).
    Stops after a stop token or max_new_tokens."""
    choose = choose or Greedy()
    cache.truncate(0)
    logits = prefill(model, cache, prompt_ids)
    for produced in range(1, max_new_tokens + 1):
        token, margin = choose.choose(logits, produced - 1)
        yield Step([token], [margin])
        if token in stop_ids or produced == max_new_tokens:
            return
        logits = decode_one(model, cache, token)


def clip_step(
    tokens: list[int], margins: list[float], produced: int, max_new_tokens: int, stop_ids: set[int]
) -> tuple[list[int], list[float], bool]:
    """Cut a multi-token step's tokens (and margins) at max_new_tokens and just after the
    first stop token; the flag says whether decoding ends with this step."""
    tokens, margins = tokens[: max_new_tokens - produced], margins[: max_new_tokens - produced]
    stop = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    if stop is not None:
        tokens, margins = tokens[: stop + 1], margins[: stop + 1]
    return tokens, margins, stop is not None or produced + len(tokens) >= max_new_tokens

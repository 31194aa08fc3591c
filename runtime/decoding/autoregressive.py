"""Autoregressive decoding (mode `ar`, the reference of every other mode) as small named
functions over the model's parts: prefill, one-token step, the loop."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from runtime.decoding.steps import Step
from runtime.batching.step_batcher import Lane
from workers.batched_step import batched_forward, prompt_segment
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.sampling import Chooser, Greedy


def prefill(model: Transformer, cache: KVCache, prompt_ids: list[int], lane: Lane | None = None) -> torch.Tensor:
    """Run the prompt through the model into the cache (after what it holds: a prompt
    extended); return the last position's logits (vocab,)."""
    return prefill_hidden(model, cache, prompt_ids, lane)[1]


def prefill_hidden(model: Transformer, cache: KVCache, prompt_ids: list[int], lane: Lane | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefill`, returning the last layer's hidden states (prompt length, dim) before the
    final norm and the last position's logits (vocab,). All rows but the last are prompt
    rows (workers.model.AttentionContext): the last is the root of the first tree step in
    the other modes, computed as a one-row step. Through `lane`, the prompt shares a pass
    with the steps of other replies decoding at once (runtime.batching), a long prompt
    in several (Lane.lead_in)."""
    if lane is None:
        lead, rest = None, prompt_ids
        h, logits = batched_forward(model, [prompt_segment(model, cache, rest)])[0]
    else:
        lead, rest = lane.lead_in(model, cache, prompt_ids)
        h, logits = lane.forward(prompt_segment(model, cache, rest))
    cache.commit(len(rest))
    return (h[0] if lead is None else torch.cat((lead.to(h.dtype), h[0]))), logits[-1]


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
    choose: Chooser | None = None,
    lane: Lane | None = None,
) -> Iterator[Step]:
    """Plain decoding: one forward pass, one token (greedy unless `choose` samples).
    Stops after a stop token or max_new_tokens. Through `lane` (a StepBatcher's seat,
    workers.batched_step) the prefill and every one-token step run in one pass with the
    steps of other requests decoding at once."""
    decode = lane.decode if lane is not None else decode_one
    choose = choose or Greedy()
    cache.truncate(0)
    logits = prefill(model, cache, prompt_ids, lane)
    for produced in range(1, max_new_tokens + 1):
        token, margin = choose.choose(logits, produced - 1)
        yield Step([token], [margin])
        if token in stop_ids or produced == max_new_tokens:
            return
        logits = decode(model, cache, token)

"""Steps of several sequences in one forward pass over one model (issue 18).

Each sequence owns its KV cache; the model's weights are shared. A pass lays the rows of
every sequence's step side by side (a `Segment`: a one-token `ar` step, or a tree step's
nodes and pseudo states, workers.tree_step): every product (projections, MLP, LM head)
runs once over all R rows, streaming each weight matrix once for all of them; attention
runs per sequence over its own cache, with its own mask. The kernels compute each row as
the sequence's own step computes it (workers.kernels: rows are independent; with the
native kernels, one `ragged_decoder_layer` call a layer), so a sequence's results are the
ones it gets alone.

Which steps share a pass, and when, is the host's business (runtime.batching: the
scheduler, its pass-cost regression and each engine's `Lane`); a decoding step reaches it
through a `SharedPass`. A prefill is a step too: its prompt rows share the pass, multiplied
by the kernels' many-row path with the other prompts' (ragged_prompt_layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.drafters.pseudo_forward import RowPlan, SameRows, planned_layers, run_to_end
from workers.kv_cache import KVCache
from workers.model import AttentionContext, DecoderLayer, Transformer


@dataclass
class Segment:
    """One sequence's step in a pass: its embedded rows h (1, n, dim), the rows and context
    each layer runs (a RowPlan: the same at every layer, or pseudo states joining), its
    cache, and the first row the LM head reads (a tree step's catch-up rows are read by no
    head). Its first prompt_rows rows take the prompt path of the kernels (workers.model.
    AttentionContext), in a pass too (ragged_prompt_layer)."""

    h: torch.Tensor
    rows: RowPlan
    cache: KVCache
    head_from: int = 0
    prompt_rows: int = 0


def one_token(model: Transformer, cache: KVCache, token: int) -> Segment:
    """The Segment of a one-token step (mode `ar`): `token` after the cache's prefix."""
    positions = torch.tensor([cache.length], device=model.device)
    return Segment(model.embed(torch.tensor([[token]], device=model.device)), SameRows(model.context(positions, cache)), cache)


def prompt_segment(model: Transformer, cache: KVCache, prompt_ids: list[int], ends_prompt: bool = True) -> Segment:
    """The Segment of a prefill: `prompt_ids` after the cache's prefix. When they end the
    prompt, every row but the last is a prompt row and the head reads the last
    (runtime.decoding.autoregressive.prefill); otherwise every row is a prompt row and no head reads them."""
    n = len(prompt_ids)
    prompt = n - 1 if ends_prompt else n
    positions = torch.arange(cache.length, cache.length + n, device=model.device)
    h = model.embed(torch.tensor([prompt_ids], device=model.device))
    return Segment(h, SameRows(model.context(positions, cache, prompt_rows=prompt)), cache, head_from=prompt, prompt_rows=prompt)


def head_logits(model: Transformer, rows: torch.Tensor) -> torch.Tensor:
    """The LM head over final states (rows, dim), before the norm; none for no rows."""
    if rows.shape[0] == 0:
        return rows.new_zeros(0, model.args.vocab_size)
    return model.lm_head(model.norm(rows))


def batched_forward(model: Transformer, segments: list[Segment]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every segment's rows through every layer in one pass; per segment, its final state
    (1, rows, dim) before the norm and the logits (rows - head_from, vocab) of its head rows.
    The caches get each segment's pending rows (the callers commit or keep them)."""
    for seg in segments:
        seg.cache.check_room(seg.h.shape[1])  # a full cache fails before the pass writes anything
    if len(segments) == 1:  # alone: the plain forward, whose layers run fused where they can
        seg = segments[0]
        h = run_to_end(planned_layers(model, seg.h, seg.rows))
        return [(h, head_logits(model, h[0, seg.head_from :]))]
    n_layers = model.args.n_layers
    joins = set().union(*(seg.rows.join_layers for seg in segments))
    parts = [seg.h for seg in segments]
    h = ctxs = cos = sin = None
    for layer in range(n_layers + 1):
        if h is None or layer in joins:  # (re)lay the rows: a plan may add rows or change its context here
            if h is not None:
                parts = list(h.split(counts, dim=1))
            planned = [seg.rows.before(layer, part) for seg, part in zip(segments, parts)]
            parts, ctxs = [p for p, _ in planned], [c for _, c in planned]
            counts = [p.shape[1] for p in parts]
            h = torch.cat(parts, dim=1)
            cos, sin = torch.cat([c.cos for c in ctxs]), torch.cat([c.sin for c in ctxs])
            order = prompt_rows_first(ctxs, counts, h.device)
        if layer < n_layers:
            if order is None:
                h = ragged_layer(model.layers[layer], h, cos, sin, ctxs, counts)
            else:
                h = ragged_prompt_layer(model.layers[layer], h, cos, sin, ctxs, counts, order)
    finals = h.split(counts, dim=1)
    heads = torch.cat([f[0, seg.head_from :] for seg, f in zip(segments, finals)])
    logits = head_logits(model, heads).split([c - seg.head_from for seg, c in zip(segments, counts)])
    return list(zip(finals, logits))


def ragged_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ctxs: list[AttentionContext], counts: list[int]) -> torch.Tensor:
    """DecoderLayer.forward over rows (1, R, dim), the next counts[s] of them sequence s's,
    attending with ctxs[s] (its mask and cache): the products over all rows, attention per
    sequence. One native call where the kernels have it."""
    caches = [ctx.cache for ctx in ctxs]
    fused = layer.kernels.ragged_decoder_layer
    if fused is not None and all(type(c) is KVCache for c in caches):
        eps, heads, kv_heads, head_dim, i = layer._shape
        out = fused(h, layer.weights(), eps, heads, kv_heads, head_dim, cos, sin, counts, [c.mask for c in ctxs],
                    [c.k[i] for c in caches], [c.v[i] for c in caches], [c.length for c in caches])
        if out is not None:
            return out
    attn = layer.self_attn
    qkv = attn.qkv(layer.input_layernorm(h), cos, sin)  # (1, R, (heads + 2 kv_heads) * head_dim)
    y = torch.cat([attn.attend(rows, ctx) for rows, ctx in zip(qkv.split(counts, dim=1), ctxs)], dim=1)
    h = h + attn.o_proj(y.to(h.dtype))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def prompt_rows_first(ctxs: list[AttentionContext], counts: list[int], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """For a pass with prompt rows (each sequence's first ctx.prompt_rows rows): an order of
    all rows with every prompt row first, its inverse, and how many prompt rows; None without."""
    if not any(ctx.prompt_rows for ctx in ctxs):
        return None
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()
    prompt = [torch.arange(s, s + ctx.prompt_rows) for s, ctx in zip(starts, ctxs)]
    rest = [torch.arange(s + ctx.prompt_rows, s + c) for s, c, ctx in zip(starts, counts, ctxs)]
    order = torch.cat(prompt + rest)
    return order.to(device), torch.argsort(order).to(device), sum(ctx.prompt_rows for ctx in ctxs)


def ragged_prompt_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        ctxs: list[AttentionContext], counts: list[int], order: tuple[torch.Tensor, torch.Tensor, int]
                        ) -> torch.Tensor:
    """ragged_layer for a pass with prompt rows: every product takes the prompt rows of all
    sequences first (the kernels' many-row path, kernels.prompt_linear, over all of them at
    once) and the other rows as their one-row steps take them; attention per sequence. A
    row's numbers are those of its sequence's step alone: each op computes every row on its own."""
    first, back, n = order
    attn = layer.self_attn
    x = layer.input_layernorm(h)[:, first]
    qkv = attn.qkv(x, cos[first], sin[first], n)[:, back]
    y = torch.cat([attn.attend(rows, ctx) for rows, ctx in zip(qkv.split(counts, dim=1), ctxs)], dim=1)
    h = h + attn.o_proj(y.to(h.dtype)[:, first], n)[:, back]
    return h + layer.mlp(layer.post_attention_layernorm(h)[:, first], n)[:, back]


class SharedPass(Protocol):
    """What runs a step's segment in one pass with other sequences' steps (runtime.batching.Lane)."""

    def forward(self, segment: Segment, expected_tokens: float = 1.0, rows: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]: ...

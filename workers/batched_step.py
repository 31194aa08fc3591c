"""One-token steps of several sequences in one forward pass over one model (issue 18).

Each sequence owns its KV cache; the model's weights are shared. A step of B sequences
lays their B new rows side by side: every product (projections, MLP, LM head) runs once
over all of them, streaming each weight matrix once for B tokens; attention runs per
sequence over its own cache. The kernels compute each row as a one-row step computes it
(workers/kernels: rows are independent), so a sequence's logits are the ones it gets
alone.

`DecodeBatcher` gathers the steps that threads decoding at once (engines sharing one
model: runtime.engine.Engine.sibling) ask for. Replies count themselves active while they
decode (`decoding`). A thread that finds no pass running waits until every active reply
has its step in, or GATHER_S at most (a reply may be in its prefill, or held back by a
slow reader), then runs every waiting step in one pass; the others wait for it and take
their logits. A reply alone never waits: batching costs a lone request nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from workers.kv_cache import KVCache
from workers.model import DecoderLayer, Transformer

GATHER_S = 0.002  # the longest a pass waits for the steps of active replies that have not sent theirs


def batched_decode(model: Transformer, caches: list[KVCache], tokens: list[int]) -> torch.Tensor:
    """Append tokens[b] to caches[b] for every b in one pass; the logits (B, vocab) for the
    position after each (float32 where the LM head gives it)."""
    for cache in caches:
        cache.check_room(1)
    device = model.device
    positions = torch.tensor([cache.length for cache in caches], device=device)
    tokens = torch.tensor([tokens], device=device)
    if len(caches) == 1:  # a step alone: the plain forward, whose layers run fused where they can
        logits = model(tokens, model.context(positions, caches[0]))[0]
    else:
        ctx = model.context(positions)  # only its rotary angles: one per row
        h = model.embed(tokens)  # (1, B, dim)
        for layer in model.layers:
            h = ragged_layer(layer, h, ctx.cos, ctx.sin, caches)
        logits = model.lm_head(model.norm(h))[0]
    for cache in caches:
        cache.commit(1)
    return logits


def ragged_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 caches: list[KVCache]) -> torch.Tensor:
    """DecoderLayer.forward over rows (1, B, dim), row b a new position of caches[b]: the
    products over all rows, attention per row over its own cache."""
    attn = layer.self_attn
    B, hd = h.shape[1], attn.head_dim
    # (1, B, (heads + 2 kv_heads) * head_dim), rotary angles of each row's own position
    qkv = attn.kernels.rotary(attn.qkv_proj(layer.input_layernorm(h)), cos, sin, attn.n_heads + attn.n_kv_heads, hd)
    rows = []
    for b, cache in enumerate(caches):
        q, k, v = qkv[:, b : b + 1].split(attn.sizes, dim=-1)  # (1, 1, heads * hd) ...
        q = q.view(1, 1, attn.n_heads, hd).transpose(1, 2)
        k = k.view(1, 1, attn.n_kv_heads, hd).transpose(1, 2)
        v = v.view(1, 1, attn.n_kv_heads, hd).transpose(1, 2)
        k, v = cache.write(attn.layer_idx, k, v)  # its prefix + the new position
        rows.append(attn.kernels.attention(q.to(k.dtype), k, v, None))  # (1, 1, heads * hd)
    y = torch.cat(rows, dim=1)
    h = h + attn.o_proj(y.to(h.dtype))
    return h + layer.mlp(layer.post_attention_layernorm(h))


@dataclass
class _Step:
    cache: KVCache
    token: int
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatchStats:
    passes: int = 0
    steps: int = 0
    largest: int = 0
    by_size: dict[int, int] = field(default_factory=dict)  # passes by their number of steps


class DecodeBatcher:
    """One-token steps from any number of threads, run together (module docstring)."""

    def __init__(self, model: Transformer):
        self.model = model
        self._cond = threading.Condition()
        self._waiting: list[_Step] = []
        self._running = False
        self._active = 0  # replies decoding (`decoding`)
        self.stats = BatchStats()

    def decoding(self, steps: Iterator) -> Iterator:
        """A reply's steps, with the reply counted active from its first step to its end."""
        with self._cond:
            self._active += 1
        try:
            yield from steps
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # a pass may be waiting for this reply's step

    def decode(self, model: Transformer, cache: KVCache, token: int) -> torch.Tensor:
        """runtime.decoding.autoregressive.decode_one's contract: append `token` to `cache`,
        return the logits (vocab,) for the position after it."""
        if model is not self.model:
            raise ValueError("this batcher steps another model")
        cache.check_room(1)  # a full cache fails its own request, not the pass it would join
        step, deadline = _Step(cache, token), None
        with self._cond:
            self._waiting.append(step)
            self._cond.notify_all()  # a thread gathering a pass may now have every step
            while not step.done:
                if self._running:
                    self._cond.wait()
                    deadline = None  # gather afresh once the pass in flight is over
                    continue
                if len(self._waiting) < self._active:
                    deadline = deadline or time.monotonic() + GATHER_S
                    left = deadline - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                batch, self._waiting, self._running = self._waiting, [], True
                break
        if not step.done:  # this thread runs the pass: its own step and whoever waits
            self._run(batch)
        if step.error is not None:
            raise step.error
        return step.logits

    def _run(self, batch: list[_Step]) -> None:
        try:
            logits = batched_decode(self.model, [s.cache for s in batch], [s.token for s in batch])
            for s, row in zip(batch, logits):
                s.logits = row
        except BaseException as e:  # noqa: BLE001 - each waiting step raises it in its own thread
            for s in batch:
                s.error = e
        with self._cond:
            for s in batch:
                s.done = True
            self._running = False
            st = self.stats
            st.passes, st.steps, st.largest = st.passes + 1, st.steps + len(batch), max(st.largest, len(batch))
            st.by_size[len(batch)] = st.by_size.get(len(batch), 0) + 1
            self._cond.notify_all()

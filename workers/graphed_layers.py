"""Decoder layers replayed from CUDA graphs, one graph per (layer, row bucket, key bucket).

On a GPU a decode step of a small model is bound by kernel launches, not by the device:
~15 kernels a layer, each launched from Python. Replaying a captured graph launches a
layer's kernels at once. Graphs need fixed shapes and fixed addresses, so a step's n rows
are padded to a row bucket (ROW_BUCKETS) and its attention reads a fixed window of the
cache, its first `keys` slots (a power of two, KEY_BUCKET_MIN at least), instead of
exactly the P + n it needs:

  rows     n real rows, then padding rows up to the bucket nb; padding rows see only
           themselves, and no real row sees them, so real rows are computed from exactly
           the keys an unpadded step uses
  cache    the step writes its nb rows' keys and values at slots P..P+nb-1 (`slots`, a
           device tensor) with index_copy_; the padding rows' slots are pending slots that
           the caller's commit/keep never keeps
  mask     (nb, keys) bool: the step's own mask in [:n, :P+n], each padding row's own slot

Graphs are captured lazily, the first time a shape is met, and share one memory pool.
Workers that share the model on threads (the pipeline's local transport) each have their
own cache, hence their own static inputs and graphs; a lock keeps one layer call at a time,
so a capture never overlaps another thread's replay.
One layer per graph keeps the layer-by-layer stepping that tree_step yields between
(the pipeline's abort and prediction read h there). Everything else in a step (embedding,
LM head, acceptance, cache compaction) runs eagerly: the acceptance walk is the one host
synchronisation a step needs.

`capture=False` runs the same padded, fixed-window layers eagerly: the CPU tests check
with it that the padding changes no token (the native kernels compute each row as a
one-row step does and skip masked keys, so the outputs are bit-identical).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from workers.kv_cache import KVCache
from workers.model import AttentionContext, Transformer

ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
KEY_BUCKET_MIN = 256


def row_bucket(n: int) -> int | None:
    """The smallest row bucket holding n rows, or None past the largest."""
    return next((b for b in ROW_BUCKETS if b >= n), None)


def key_bucket(needed: int, max_len: int) -> int:
    """The cache window a step with `needed` = P + nb slots attends to."""
    keys = KEY_BUCKET_MIN
    while keys < needed:
        keys *= 2
    return min(keys, max_len)


class CacheWindow:
    """The first `keys` slots of a KVCache, written at `slots` (a device tensor): what an
    Attention layer sees as ctx.cache in a fixed-shape step (it calls `write`, as on a KVCache)."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, keys: int):
        self.cache, self.slots, self.keys = cache, slots, keys

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (1, kv_heads, nb, head_dim) -> the window's keys and values (1, kv_heads, keys, head_dim)."""
        self.cache.k[layer].index_copy_(2, self.slots, k.to(self.cache.k.dtype))
        self.cache.v[layer].index_copy_(2, self.slots, v.to(self.cache.v.dtype))
        return self.cache.k[layer, :, :, : self.keys], self.cache.v[layer, :, :, : self.keys]


@dataclass
class StaticInputs:
    """The fixed-address inputs of every graph of one (rows, keys, cache) shape."""

    h: torch.Tensor  # (1, nb, dim) the layer's input
    cos: torch.Tensor  # (nb, head_dim)
    sin: torch.Tensor
    mask: torch.Tensor  # (nb, keys) bool
    slots: torch.Tensor  # (nb,) long: the cache slots the rows write
    ctx: AttentionContext  # over the above, with a CacheWindow


class GraphedLayers:
    """`run(layer, h, ctx)` = model.layers[layer](h, ctx), padded to fixed shapes and, with
    `capture`, replayed from a CUDA graph. `fits` says when it applies: inference mode (its
    static buffers are inference tensors), one sequence, rows within the buckets, the padded
    step within the cache."""

    def __init__(self, model: Transformer, capture: bool = True):
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model, self.capture = model, capture
        self.inputs: dict[tuple[int, int, int], StaticInputs] = {}
        self.graphs: dict[tuple[int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._lock = threading.Lock()
        self._prepared = threading.local()  # .step: (ctx, cache length, StaticInputs) of this thread's step

    def fits(self, h: torch.Tensor, ctx: AttentionContext) -> bool:
        cache, n = ctx.cache, h.shape[1]
        return (
            torch.is_inference_mode_enabled()
            and isinstance(cache, KVCache)
            and h.shape[0] == 1
            and ctx.cos.dim() == 2
            and (nb := row_bucket(n)) is not None
            and cache.length + nb <= cache.max_len
        )

    def run(self, layer: int, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """h (1, n, dim) after `layer`, (1, n, dim); the caller checked `fits`."""
        n = h.shape[1]
        with self._lock:
            static = self._static(ctx, n)
            static.h[:, :n].copy_(h)
            if not self.capture:
                return self.model.layers[layer](static.h, static.ctx)[:, :n]
            key = (layer, static.h.shape[1], static.mask.shape[1], ctx.cache.k.data_ptr())
            if key not in self.graphs:
                self.graphs[key] = self._capture(layer, static)
            graph, out = self.graphs[key]
            graph.replay()
            return out[:, :n].clone()  # the graph's output buffer is overwritten by its next replay

    def _static(self, ctx: AttentionContext, n: int) -> StaticInputs:
        """The static inputs for `ctx`, filled once per step (every layer of a step shares its ctx)."""
        cache = ctx.cache
        prepared = getattr(self._prepared, "step", None)
        if prepared is not None and prepared[0] is ctx and prepared[1] == cache.length:
            return prepared[2]
        P, nb = cache.length, row_bucket(n)
        keys = key_bucket(P + nb, cache.max_len)
        shape = (nb, keys, cache.k.data_ptr())
        if shape not in self.inputs:
            self.inputs[shape] = self._new_inputs(cache, nb, keys)
        static = self.inputs[shape]
        static.cos[:n].copy_(ctx.cos)
        static.sin[:n].copy_(ctx.sin)
        static.slots.copy_(torch.arange(P, P + nb, device=static.slots.device))
        static.mask.zero_()
        if ctx.mask is None:  # one causal row over the prefix and itself
            static.mask[:n, : P + n] = True
        else:
            static.mask[:n, : P + n] = ctx.mask
        pad = torch.arange(n, nb, device=static.mask.device)
        static.mask[pad, P + pad] = True  # a padding row sees its own slot only
        self._prepared.step = (ctx, P, static)
        return static

    def _new_inputs(self, cache: KVCache, nb: int, keys: int) -> StaticInputs:
        m, device = self.model, self.model.device
        h = torch.zeros(1, nb, m.args.dim, dtype=m.dtype, device=device)
        cos = torch.zeros(nb, m.args.head_dim, dtype=m.dtype, device=device)
        sin = torch.zeros_like(cos)
        mask = torch.zeros(nb, keys, dtype=torch.bool, device=device)
        slots = torch.zeros(nb, dtype=torch.long, device=device)
        return StaticInputs(h, cos, sin, mask, slots, AttentionContext(cos, sin, mask, CacheWindow(cache, slots, keys)))

    def _capture(self, layer: int, static: StaticInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture layer `layer` over `static`, after warm-up runs on a side stream (as
        torch.cuda.graphs asks). The warm-up writes the cache at the step's own pending
        slots, which the replay writes again."""
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.layers[layer](static.h, static.ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (their eager ops) do not break the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.model.layers[layer](static.h, static.ctx)
        return graph, out

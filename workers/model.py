"""Decoder-only transformer of the Llama family (Llama 2/3, Qwen2, Mistral) in plain torch.

No decoding loop lives here. The model exposes its parts as separate calls so that
drafters can read the hidden state after any layer, join extra positions at a chosen
layer, or run only a range of layers:

    h = model.embed(tokens)                          # (B, n) -> (B, n, dim)
    h = model.run_layers(h, ctx, start, end)         # layers [start, end)
    logits = model.lm_head(model.norm(h))            # (B, n, vocab); float32 from the native kernels

`ctx` (an AttentionContext, made by `model.context`) carries the rotary angles of the
new positions, the attention mask of the new positions over prefix + new, and the KV
cache the layers append to. A token tree is just another mask: each node attends to
the cached prefix and to its ancestors.

Parameter names follow Hugging Face's (without the leading "model."), except that
q/k/v and gate/up projections are fused (workers.loading concatenates them on load).
Linear layers, norms and rotary embeddings compute with the kernels `use_kernels` picks
(workers.kernels: PyTorch's as the reference, native CPU ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels.choice import TORCH, Kernels, resolve_kernels, weight_layout
from workers.kv_cache import KVCache


@dataclass(frozen=True)
class ModelArgs:
    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None


@dataclass
class AttentionContext:
    cos: torch.Tensor  # (n, head_dim) or (B, n, head_dim), already scaled by the rope attention factor
    sin: torch.Tensor
    mask: torch.Tensor | None  # bool (n, prefix + n), True = may attend; None = attend to all
    cache: KVCache | None
    # The first prompt_rows rows are prompt positions (not the prompt's last token), which the
    # kernels may multiply with a faster many-row path (kernels.prompt_linear). Each prompt
    # position must be computed the same way in every mode, so each path that runs them says
    # so: ar's prefill, a tree step's catch-up (workers.tree_step.prompt_rows_of); the other
    # rows are computed as one-row steps compute them.
    prompt_rows: int = 0


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) multiplying with `kernels.linear`, or
    `kernels.prompt_linear` when the first `prompt_rows` rows are prompt rows (AttentionContext)."""

    kernels: Kernels = TORCH  # Transformer.use_kernels sets it

    def forward(self, x: torch.Tensor, prompt_rows: int = 0) -> torch.Tensor:
        if prompt_rows:
            return self.kernels.prompt_linear(x, self.weight, self.bias, prompt_rows)
        return self.kernels.linear(x, self.weight, self.bias)


class LogitsHead(Linear):
    """The LM head. The native kernels sum in float32 whatever the dtype, so in bfloat16 they
    hand back the float32 logits instead of rounding them to bfloat16, which makes ties out
    of near ties (a bfloat16 logit near 15 has a step of 0.0625). The PyTorch kernels, and
    training (gradients run through the reference), return the model's dtype."""

    def forward(self, x: torch.Tensor, prompt_rows: int = 0) -> torch.Tensor:
        if self.kernels.name == "native" and x.dtype != torch.float32 and not torch.is_grad_enabled():
            return self.kernels.linear(x, self.weight, self.bias, float_out=True)
        return super().forward(x, prompt_rows)


class RMSNorm(nn.Module):
    kernels: Kernels = TORCH

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)  # computed in float32 whatever the dtype


class Attention(nn.Module):
    kernels: Kernels = TORCH

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v projections fused into one matrix: one matmul instead of three.
        self.sizes = (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim)
        self.qkv_proj = Linear(args.dim, sum(self.sizes), bias=args.qkv_bias)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        y = self.attend(self.qkv(x, ctx.cos, ctx.sin, ctx.prompt_rows), ctx)
        return self.o_proj(y.to(x.dtype), ctx.prompt_rows)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prompt_rows: int = 0) -> torch.Tensor:
        """(B, n, (heads + 2 kv_heads) * head_dim): the fused projection, rotary angles applied to the q and k heads."""
        return self.kernels.rotary(self.qkv_proj(x, prompt_rows), cos, sin, self.n_heads + self.n_kv_heads, self.head_dim)

    def attend(self, qkv: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Attention of the rows of `qkv` over ctx's cache (their keys and values written to
        it) and each other, as ctx.mask allows: (B, n, heads * head_dim), before o_proj."""
        B, n, _ = qkv.shape
        # -> (B, heads, n, head_dim) each
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_idx, k, v)  # prefix + new: (B, kv_heads, P + n, head_dim)
            q = q.to(k.dtype)  # attention runs in the cache's dtype (Transformer.attention_dtype)
        return self.kernels.attention(q, k, v, ctx.mask)  # (B, n, heads * head_dim)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # fused
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, prompt_rows: int = 0) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, prompt_rows).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, prompt_rows)


class DecoderLayer(nn.Module):
    kernels: Kernels = TORCH

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        # What `fused` hands the kernel, in its order (a plain tuple: not registered again as submodules).
        a = self.self_attn
        self._parts = (self.input_layernorm, a.qkv_proj, a.o_proj, self.post_attention_layernorm,
                       self.mlp.gate_up_proj, self.mlp.down_proj)  # fmt: skip
        self._shape = (args.norm_eps, args.n_heads, args.n_kv_heads, args.head_dim, layer_idx)

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        fused = self.fused(h, ctx)
        if fused is not None:
            return fused
        h = h + self.self_attn(self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h), ctx.prompt_rows)

    def fused(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """The layer in one kernel call where the kernels have one (the native kernels: the
        same numbers without Python's dispatch of each op), for steps over a KVCache that
        have no prompt rows; None otherwise."""
        if self.kernels.decoder_layer is None or ctx.prompt_rows or type(ctx.cache) is not KVCache:
            return None
        cache = ctx.cache
        cache.check_room(h.shape[1])
        eps, heads, kv_heads, head_dim, layer = self._shape
        return self.kernels.decoder_layer(
            h, self.weights(), eps, heads, kv_heads, head_dim, ctx.cos, ctx.sin, ctx.mask, cache.k[layer], cache.v[layer],
            cache.length,
        )

    def weights(self) -> tuple[torch.Tensor | None, ...]:
        """What a fused layer call takes, in its order (workers.kernels.native.decoder_layer)."""
        # Read from each module's parameter dict, which always holds its current parameters:
        # nn.Module's attribute lookup costs ~0.5 us a name, ~1 ms a step over 30 layers.
        norm1, qkv, o, norm2, gate_up, down = (m._parameters for m in self._parts)
        return (
            norm1["weight"], qkv["weight"], qkv.get("bias"), o["weight"], o.get("bias"),
            norm2["weight"], gate_up["weight"], gate_up.get("bias"), down["weight"], down.get("bias"),
        )  # fmt: skip


def set_kernels(root: nn.Module, kernels: Kernels) -> None:
    """Make every part of `root` (a model, or a drafter built of its parts) compute with
    `kernels`, each weight in the layout they stream fastest."""
    for module in root.modules():
        if isinstance(module, (Linear, RMSNorm, Attention, DecoderLayer)):
            module.kernels = kernels
        if isinstance(module, Linear):
            module.weight.data = weight_layout(kernels, module.weight.data)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, inv_freq: torch.Tensor, rope_scale: float = 1.0):
        """`inv_freq` (head_dim // 2,) are the rotary frequencies, rope scaling already applied;
        `rope_scale` multiplies cos and sin (YaRN's attention factor, 1.0 otherwise)."""
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = LogitsHead(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Kept out of the parameters and buffers so that .to(bfloat16) leaves it in float32.
        self.inv_freq = inv_freq.float()
        self.rope_scale = rope_scale
        self.kernels = TORCH  # what use_kernels chose
        self.graphs = None  # workers.graphed_layers.GraphedLayers once use_graphs set them (CUDA)

    def use_kernels(self, name: str = "auto") -> Kernels:
        """Compute with kernels `name` (configs.schema.KERNELS; workers.kernels), each weight in
        the layout those kernels stream fastest; returns the kernels chosen."""
        self.kernels = resolve_kernels(name, self.device, self.dtype)
        set_kernels(self, self.kernels)
        return self.kernels

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def attention_dtype(self) -> torch.dtype:
        """The KV cache's dtype, in which attention runs: float32 on the CPU, where PyTorch has
        no fast bfloat16 or float16 attention (bfloat16 keys and values are exact in float32;
        a bfloat16 decode step's attention at 1,000 positions: 680 us vs 100 us a layer,
        docs/results.md); the model's dtype elsewhere."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        a = self.args
        return KVCache(
            a.n_layers, a.n_kv_heads, a.head_dim, max_len, batch=batch, dtype=self.attention_dtype, device=self.device
        )

    def context(
        self,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        tree_mask: torch.Tensor | None = None,
        prompt_rows: int = 0,
    ) -> AttentionContext:
        """Attention context for n new positions after the cache's committed prefix.

        positions: (n,) or (B, n) absolute positions of the new tokens.
        tree_mask: (n, n) bool, True where new token i may attend to new token j (itself
        and its ancestors); None means causal order.
        prompt_rows: how many of the first rows are prompt positions (AttentionContext).
        """
        n = positions.shape[-1]
        prefix = cache.length if cache is not None else 0
        # Rotary angles in float32, cast to the model dtype at the end (as the references do).
        angles = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        cos = (angles.cos() * self.rope_scale).to(self.dtype)
        sin = (angles.sin() * self.rope_scale).to(self.dtype)

        window = self.args.sliding_window
        windowed = window is not None and prefix + n > window
        if n == 1 and tree_mask is None and not windowed:
            return AttentionContext(cos, sin, None, cache, prompt_rows)
        if tree_mask is None:
            tree_mask = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
        mask = torch.cat((torch.ones(n, prefix, dtype=torch.bool, device=positions.device), tree_mask), dim=1)
        if windowed:
            # Mistral-style sliding window: a query sees keys less than `window` positions back.
            q_pos = positions.reshape(-1, n)[0]
            k_pos = torch.cat((torch.arange(prefix, device=positions.device), q_pos))
            mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
        return AttentionContext(cos, sin, mask, cache, prompt_rows)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def use_graphs(self, graphs) -> None:
        """Run decoder layers through `graphs` (workers.graphed_layers.GraphedLayers, or None
        for plain calls) wherever their shapes allow."""
        self.graphs = graphs

    def layer(self, i: int, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Decoder layer i over h (B, n, dim): replayed from a captured graph where one applies."""
        if self.graphs is not None and self.graphs.fits(h, ctx):
            return self.graphs.run(i, h, ctx)
        return self.layers[i](h, ctx)

    def run_layers(self, h: torch.Tensor, ctx: AttentionContext, start: int = 0, end: int | None = None) -> torch.Tensor:
        for i in range(start, self.args.n_layers if end is None else end):
            h = self.layer(i, h, ctx)
        return h

    def forward(self, tokens: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """tokens (B, n) -> logits (B, n, vocab) through every layer."""
        return self.lm_head(self.norm(self.run_layers(self.embed(tokens), ctx)))

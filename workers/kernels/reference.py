"""The PyTorch kernels: the reference that the native ones are tested against.

Shapes: x (..., dim); q (B, heads, n, head_dim), k and v (B, kv_heads, keys, head_dim),
mask (n, keys) bool, True = may attend, or None = all; qkv (..., (heads + 2 * kv_heads) * head_dim), the fused projection;
cos, sin (n, head_dim) or (B, n, head_dim), broadcasting over the leading dims of qkv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.kernels.quant_blocks import dequantize, is_quantized, quantize_rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a quantized weight (workers.kernels.quant_blocks) de-quantized first, on every
    call, and x rounded to int8 blocks first where the weight's blocks are typed int8."""
    if is_quantized(weight):
        if weight.dtype == torch.int8:
            x = quantize_rows(x).to(x.dtype)
        weight = dequantize(weight).to(x.dtype)
    return F.linear(x, weight, bias)


def prompt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """linear: PyTorch computes prompt rows as any others."""
    return linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """qkv with the rotary embedding applied to its first `heads` heads (the q and k heads)."""
    rot = heads * head_dim
    x = qkv[..., :rot].unflatten(-1, (heads, head_dim))  # (..., n, heads, head_dim)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = x * cos + rotate_half(x) * sin
    return torch.cat((rotated.flatten(-2), qkv[..., rot:]), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, n, heads * head_dim) in q's dtype: each head's softmax(q k^T / sqrt(head_dim)) v."""
    B, heads, n, head_dim = q.shape
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != k.shape[1])
    return y.transpose(1, 2).reshape(B, n, heads * head_dim)

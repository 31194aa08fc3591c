"""The GGUF block formats that the kernels multiply as they are (workers/kernels/quant.h).

A quantized weight is a uint8 tensor (out_features, in_features / 32, block_bytes): each
row's blocks of 32 weights in ascending order, the file's bytes unchanged. The block size
in bytes names the format (ggml's block types all differ in size), so the tensor alone
says how to read it. The same bytes typed int8 ask the kernels to quantize x to int8 per
block of 32 before multiplying (llama.cpp's way: `quantize_rows`), uint8 to multiply x in
float32. `dequantize` is the reference: float32 weights computed exactly as gguf-py (and
with it transformers' GGUF loader) computes them.
"""

from __future__ import annotations

import torch

BLOCK = 32  # weights a block
# format name -> bytes a block: Q4_1 = float16 d, float16 m, 16 bytes of nibbles (weight i in
# byte i's low nibble, weight i + 16 in its high one), d * q + m; Q5_0 = float16 d, 32 bits
# (bit i: weight i's fifth bit), 16 bytes of nibbles as Q4_1's, d * (q - 16); Q8_0 =
# float16 d, 32 int8, d * q.
BLOCK_BYTES = {"Q4_1": 20, "Q5_0": 22, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}
# weights a block: the K formats' blocks hold 256 (8 x 32: workers/kernels/quant_k.h), and
# take float32 x only (typed uint8)
BLOCK_WEIGHTS = {"Q4_1": BLOCK, "Q5_0": BLOCK, "Q8_0": BLOCK, "Q4_K": 256, "Q6_K": 256}
FORMAT_OF_BYTES = {size: name for name, size in BLOCK_BYTES.items()}


def is_quantized(weight: torch.Tensor) -> bool:
    return weight.dtype in (torch.uint8, torch.int8)


def format_of(blocks: torch.Tensor) -> str:
    if not is_quantized(blocks) or blocks.dim() != 3 or blocks.shape[2] not in FORMAT_OF_BYTES:
        raise ValueError(f"not quantized blocks: {blocks.dtype} {tuple(blocks.shape)} (formats: {BLOCK_BYTES})")
    return FORMAT_OF_BYTES[blocks.shape[2]]


def _halves(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian float16 -> (...,) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """(out, in / block weights, block_bytes) uint8 -> (out, in) float32, as gguf-py de-quantizes: the
    scale times the quantized value rounded to float32, then (Q4_1) plus the minimum."""
    fmt = format_of(blocks)
    blocks = blocks.view(torch.uint8)
    out, n = blocks.shape[0], blocks.shape[1]
    if BLOCK_WEIGHTS[fmt] != BLOCK:  # the K formats: gguf-py's own numbers
        from gguf import GGMLQuantizationType, quants

        flat = quants.dequantize(blocks.reshape(out, -1).numpy(), GGMLQuantizationType[fmt])
        return torch.from_numpy(flat.astype("float32"))
    d = _halves(blocks[..., 0:2]).unsqueeze(-1)  # (out, n, 1)
    if fmt == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(out, n * BLOCK)
    if fmt == "Q5_0":
        fifth = blocks[..., 2:6].contiguous().view(torch.int32)  # (out, n, 1), little-endian
        high = (fifth >> torch.arange(32, dtype=torch.int32)) & 1  # (out, n, 32)
        qs = blocks[..., 6:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).to(torch.int32) | (high << 4)
        return (d * (q - 16).float()).reshape(out, n * BLOCK)
    m = _halves(blocks[..., 2:4]).unsqueeze(-1)
    qs = blocks[..., 4:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # weights 0-15, then 16-31
    return (d * q + m).reshape(out, n * BLOCK)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., k) as the int8 variant sees it (quant_i8.h, quantize_rows), in float32: each
    block of 32 values of a row scaled by d = max|x| / 127, rounded to the nearest integer
    (ties to even), times d again."""
    xb = x.float().unflatten(-1, (-1, BLOCK))
    d = xb.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inverse) * d).flatten(-2)

"""The GGUF file's quantized weights, as they are, for the model's linear layers.

`[model] weights = "shipped"` (workers.loading.load_model) keeps each linear layer's
weight in the file's own blocks (Q4_1, Q5_0, Q8_0, Q4_K or Q6_K: workers/kernels/quant_blocks.py;
a uint8 tensor (out_features, in_features / block weights, block_bytes)); the kernels multiply them without
de-quantizing to memory (workers/kernels/quant.h). Everything else (embeddings, norms,
and any linear weight in a format the kernels do not take) comes from the float
checkpoint, as with `weights = "float"`.

GGUF names -> ours: blk.N.attn_q/attn_k/attn_v -> layers.N.self_attn.qkv_proj (rows
concatenated, as workers.loading fuses them), attn_output -> o_proj, ffn_gate/ffn_up ->
layers.N.mlp.gate_up_proj, ffn_down -> down_proj, output -> lm_head (token_embd when the
embeddings are tied: the LM head then reads the file's blocks, the embedding table stays
float). A llama-architecture file stores q and k with their rows permuted for llama.cpp's
rotary layout; transformers' GGUF loader un-permutes them, and so do we: a permutation of
whole rows, so it moves whole rows of blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from workers.kernels.quant_blocks import BLOCK_BYTES, BLOCK_WEIGHTS, format_of

# GGUF's per-layer tensor -> (our fused weight, its part's index in the fusion)
LAYER_PARTS = {
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": ("self_attn.o_proj", 0),
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", 0),
}
PARTS_OF = {"self_attn.qkv_proj": 3, "self_attn.o_proj": 1, "mlp.gate_up_proj": 2, "mlp.down_proj": 1}


def field_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value[0].item()


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's rotary permutation of a q or k weight (as
    transformers' LlamaTensorProcessor._reverse_permute_weights does to the float rows)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def tensor_blocks(tensor) -> torch.Tensor | None:
    """A GGUF tensor's blocks (rows, in / 32, block_bytes) uint8, or None when its type is not
    one the kernels take."""
    name = tensor.tensor_type.name
    if name not in BLOCK_BYTES:
        return None
    data = np.asarray(tensor.data)  # (rows, row_bytes) uint8, a view of the memory-mapped file
    rows, row_bytes = data.shape
    assert row_bytes % BLOCK_BYTES[name] == 0, f"{tensor.name}: {row_bytes} bytes a row"
    return torch.from_numpy(data.copy()).reshape(rows, row_bytes // BLOCK_BYTES[name], BLOCK_BYTES[name])


def read_shipped(gguf: Path, n_layers: int, tie_embeddings: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our weight name -> quantized blocks, for each linear weight whose parts are all in one
    format the kernels take; and the names left in float (a part in another format, or parts
    in different formats: rows of different formats do not concatenate)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    arch = field_value(reader, "general.architecture")
    heads = field_value(reader, f"{arch}.attention.head_count")
    kv_heads = field_value(reader, f"{arch}.attention.head_count_kv") or heads
    tensors = {t.name: t for t in reader.tensors}
    parts: dict[str, list] = {}
    for i in range(n_layers):
        for gguf_name, (ours, index) in LAYER_PARTS.items():
            parts.setdefault(f"layers.{i}.{ours}.weight", [None] * PARTS_OF[ours])[index] = tensors.get(f"blk.{i}.{gguf_name}.weight")
    head = tensors.get("output.weight")
    if head is None and tie_embeddings:
        head = tensors.get("token_embd.weight")
    parts["lm_head.weight"] = [head]
    shipped, left = {}, []
    for ours, tensors_of in parts.items():
        blocks = [None if t is None else tensor_blocks(t) for t in tensors_of]
        if any(b is None for b in blocks) or len({b.shape[2] for b in blocks}) > 1:
            left.append(ours)
            continue
        if arch == "llama" and ours.endswith("qkv_proj.weight"):  # q, then k (with kv_heads), un-permuted
            blocks[0] = blocks[0][torch.from_numpy(unpermute_rows(blocks[0].shape[0], heads))]
            blocks[1] = blocks[1][torch.from_numpy(unpermute_rows(blocks[1].shape[0], kv_heads))]
        shipped[ours] = torch.cat(blocks).contiguous()
    return shipped, left


def use_shipped_weights(model: nn.Module, gguf: Path, int8_activations: bool = False) -> list[str]:
    """Replace the linear weights of `model` (a workers.model.Transformer on the CPU, its float
    weights loaded from the same file) by the file's blocks; returns the names left in float.
    A tied LM head is untied: it reads the blocks, the embedding table keeps its floats.
    `int8_activations`: the blocks typed int8, which has the kernels quantize x to int8 per
    block first (workers/kernels/quant_i8.h); uint8 otherwise (x in float32), and always
    for the K formats (Q4_K, Q6_K), which the int8 variant does not take."""
    args = model.args
    shipped, left = read_shipped(gguf, args.n_layers, args.tie_embeddings)
    modules = dict(model.named_modules())
    for name, blocks in shipped.items():
        module = modules[name.removesuffix(".weight")]
        out_features, in_features = module.weight.shape
        if blocks.shape[0] != out_features or blocks.shape[1] * BLOCK_WEIGHTS[format_of(blocks)] != in_features:
            raise ValueError(f"{gguf}: {name} has blocks {tuple(blocks.shape)}, the model ({out_features}, {in_features})")
        int8 = int8_activations and BLOCK_WEIGHTS[format_of(blocks)] == 32  # K formats: float32 x (quant_k.h)
        module.weight = nn.Parameter(blocks.view(torch.int8) if int8 else blocks, requires_grad=False)
    return left

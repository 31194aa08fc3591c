"""A decode step's matrix products by weight kind (issue 39): the default model's 121
products (30 layers x qkv, o, gate/up, down, then the LM head) with the GGUF file's own
blocks, x in float32 (`shipped`) or quantized to int8 (`shipped-int8`), against bfloat16
weights and rows (`bfloat16`, products.h). Median ms of each, taking turns, for a few row
counts and thread counts; the CPU is recorded with the figures.

    python scripts/time_quant_products.py --rows 1,2,4,8 --threads 1,2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.cpu_info import describe_cpu  # noqa: E402
from workers.gguf_weights import read_shipped  # noqa: E402
from workers.kernels import native  # noqa: E402
from workers.kernels.quant_blocks import BLOCK_WEIGHTS, dequantize, format_of  # noqa: E402
from workers.loading import default_gguf_path  # noqa: E402


def step_weights() -> dict[str, list[torch.Tensor]]:
    """Each kind's 121 weights, in the order a step multiplies them."""
    shipped, _ = read_shipped(default_gguf_path(), 30, tie_embeddings=True)
    names = [f"layers.{i}.{p}.weight" for i in range(30) for p in
             ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")] + ["lm_head.weight"]
    blocks = [shipped[n] for n in names]
    return {"shipped": blocks, "shipped-int8": [b.view(torch.int8) for b in blocks],
            "bfloat16": [dequantize(b).bfloat16() for b in blocks]}


def in_features(w: torch.Tensor) -> int:
    return w.shape[1] * BLOCK_WEIGHTS[format_of(w)] if w.dim() == 3 else w.shape[1]


def median_ms(weights: list[torch.Tensor], rows: int, dtype: torch.dtype, repeats: int) -> float:
    xs = {k: torch.randn(rows, k).to(dtype) for k in {in_features(w) for w in weights}}
    inputs = [xs[in_features(w)] for w in weights]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for x, w in zip(inputs, weights):
            native.linear(x, w, None)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    kinds = step_weights()
    print(f"{describe_cpu()}; median ms of a step's 121 products (x float32 for shipped, bfloat16 for bfloat16)")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in map(int, args.rows.split(",")):
            ms = {kind: median_ms(w, rows, torch.bfloat16 if kind == "bfloat16" else torch.float32, args.repeats)
                  for kind, w in kinds.items()}
            print(f"threads {threads} rows {rows}: " + "  ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()

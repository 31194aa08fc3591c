"""The native attention kernel's time on each of its paths (AVX-512 and AVX2), one process.

A step's attention for the default model's shape: 30 layers of 9 query heads over 3 kv
heads of 64 dims, n query rows over c cached keys (float32, as the KV cache holds them).
The two paths take turns, round after round, and each shape reports the median of the
rounds in ms.

    python scripts/time_attention.py --rows 1,4,8,16 --contexts 128,512,1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from workers.kernels import native

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int_list, default=[1, 4, 8, 16])
    p.add_argument("--contexts", type=int_list, default=[128, 512, 1024])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    longest = max(args.contexts) + max(args.rows)
    keys = [torch.randn(1, KV_HEADS, longest, HEAD_DIM, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(1, KV_HEADS, longest, HEAD_DIM, generator=g) for _ in range(LAYERS)]
    paths = {"avx512": True, "avx2": False}
    result: dict[str, dict[int, dict[int, float]]] = {path: {c: {} for c in args.contexts} for path in paths}
    for c in args.contexts:
        for n in args.rows:
            q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)
            mask = torch.ones(n, c + n, dtype=torch.bool)
            times: dict[str, list[float]] = {path: [] for path in paths}
            for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
                for path, on in paths.items():
                    if native.use_avx512(on) != on:
                        continue  # this CPU has no AVX-512
                    t0 = time.perf_counter()
                    for layer in range(LAYERS):
                        native.attention(q, keys[layer][:, :, : c + n], values[layer][:, :, : c + n], mask)
                    if round_:
                        times[path].append(1000 * (time.perf_counter() - t0))
            for path, ts in times.items():
                if ts:
                    result[path][c][n] = round(statistics.median(ts), 3)
    native.use_avx512(True)
    for path, by_context in result.items():
        for c, by_rows in by_context.items():
            if by_rows:
                print(f"{path:6s} c={c:<5d}" + "".join(f"  n={n}: {ms:6.2f}" for n, ms in by_rows.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "ms_median": result}, f, indent=1)


if __name__ == "__main__":
    main()

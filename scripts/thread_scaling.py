"""What a second CPU core buys: one forward pass of an n-token tree step (after a
prefix) with 2 torch threads in one process, with 1 thread, and with 1 thread in each of
two processes running at the same time (two pipelined workers on 2 cores).

This bounds the pipelined modes on this machine (docs/results.md, issue 5): two
1-thread workers finish 2 steps per `parallel` ms, single-worker `ht` 1 step per
`2 threads` ms.

    python scripts/thread_scaling.py --dtype bfloat16 --tokens 12 --prefix 200
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def time_forward(threads: int, dtype: str, tokens: int, prefix: int, repeats: int, start=None) -> float:
    """Median ms of one forward pass of `tokens` new positions after `prefix` cached ones."""
    from configs.schema import ModelConfig
    from workers.loading import load_model

    torch.set_num_threads(threads)
    config = ModelConfig(dtype=dtype, device="cpu")
    model, _ = load_model(config.checkpoint, config.torch_dtype(), config.torch_device(), config.kernels)
    cache = model.new_cache(prefix + tokens + 8)
    ids = torch.randint(0, model.args.vocab_size, (1, prefix + tokens))
    with torch.inference_mode():
        model.forward(ids[:, :prefix], model.context(torch.arange(prefix), cache))
        cache.commit(prefix)
        positions = torch.arange(prefix, prefix + tokens)
        if start is not None:  # both processes start timing together
            start.wait()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.forward(ids[:, prefix:], model.context(positions, cache))
            times.append(1000 * (time.perf_counter() - t))
            cache.truncate(prefix)
    return statistics.median(times)


def worker(args, start, out) -> None:
    out.put(time_forward(1, args.dtype, args.tokens, args.prefix, args.repeats, start))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=12, help="new positions per forward (a step's tree)")
    p.add_argument("--prefix", type=int, default=200, help="cached positions before them")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    two = time_forward(2, args.dtype, args.tokens, args.prefix, args.repeats)
    one = time_forward(1, args.dtype, args.tokens, args.prefix, args.repeats)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(args, start, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    parallel = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    print(f"{args.dtype}, {args.tokens} tokens after {args.prefix}, median of {args.repeats}:")
    print(f"  one process, 2 threads:         {two:6.1f} ms")
    print(f"  one process, 1 thread:          {one:6.1f} ms  ({one / two:.2f}x the 2-thread time)")
    print(f"  two 1-thread processes at once: {max(parallel):6.1f} ms each (slower of the two)")
    print(f"  ceiling of 2 pipelined workers over 1 two-thread worker: {2 * two / max(parallel):.2f}x (every prediction right)")


if __name__ == "__main__":
    main()

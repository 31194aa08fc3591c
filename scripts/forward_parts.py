"""Where a forward step's time goes, PyTorch kernels against native ones, in one run
(docs/results.md, issue 14):

    python scripts/forward_parts.py --dtype bfloat16 --rows 1,4,16 --out docs/bench/F.json

For each kernel set (workers.kernels) and row count n it times, on the default model:
  matmuls    the model's 121 linear layers one after another, as a step runs them (their
             weights stream from memory: 270 MB in bfloat16 do not fit in any cache)
  attention  the 30 layers' attention over `--context` cached positions (kernels.attention)
  step       a whole forward of n rows after `--context` positions (model, no acceptance)
  rest       step - matmuls - attention: norms, rotary, cache writes, small ops, Python
Each figure is the median of `--repeats` runs, in ms; the kernel sets alternate run by run,
so a noisy neighbour slows both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from workers.loading import load_model


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return out


@torch.inference_mode()
def parts(model, n: int, context: int):
    """Three callables timing the matmuls, the attention and the whole step for n rows."""
    args = model.args
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, n, m.in_features).to(model.dtype) for m in linears]
    cache = model.new_cache(context + n + 1)
    prompt = torch.randint(0, args.vocab_size, (1, context))
    model(prompt, model.context(torch.arange(context), cache))
    cache.commit(context)
    tokens = torch.randint(0, args.vocab_size, (1, n))
    positions = torch.arange(context, context + n)
    mask = torch.ones(n, n, dtype=torch.bool).tril() if n > 1 else None
    ctx = model.context(positions, cache, mask)
    q = torch.randn(1, args.n_heads, n, args.head_dim).to(cache.k.dtype)
    keys, values = cache.k[:, :, :, : context + n], cache.v[:, :, :, : context + n]

    def matmuls():
        for m, x in zip(linears, xs):
            m(x)

    def attention():
        for layer in range(args.n_layers):
            model.kernels.attention(q, keys[layer], values[layer], ctx.mask)

    def step():
        model(tokens, model.context(positions, cache, mask))

    return {"matmuls": matmuls, "attention": attention, "step": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("default", getattr(torch, args.dtype), "cpu", "native")
    result = {"dtype": args.dtype, "context": args.context, "threads": args.threads, "repeats": args.repeats, "ms": {}}
    for n in [int(r) for r in args.rows.split(",")]:
        times = {"torch": {}, "native": {}}
        for _ in range(args.repeats):
            for kernels in ("torch", "native"):
                model.use_kernels(kernels)
                with torch.inference_mode():
                    for name, fn in parts(model, n, args.context).items():
                        times[kernels].setdefault(name, []).extend(timed(fn, 1))
        for kernels, t in times.items():
            med = {k: round(statistics.median(v), 2) for k, v in t.items()}
            med["rest"] = round(med["step"] - med["matmuls"] - med["attention"], 2)
            result["ms"].setdefault(kernels, {})[n] = med
            print(f"n={n:<3} {kernels:6s} " + "  ".join(f"{k} {v:7.2f}" for k, v in med.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Time to first token by prompt path (issue 36): a bfloat16 prefill of Spec-Bench text at
several prompt lengths, its prompt rows multiplied by each path in turn in one process:
`amx` (our tiles, cpu_kernels.cpp prompt_linear; AMX CPUs only), `rows` (linear, the
few-row kernels, what CPUs without AMX take), and `onednn` (PyTorch's GEMM, what prompt rows
took before issue 36; not lossless across row counts on AMX CPUs, timed for comparison).
Median ms of each, taking turns; the CPU is recorded with the figures.

    python scripts/time_prefill.py --lengths 128,512,900 --out docs/bench/issue36-prefill.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.files import load_config  # noqa: E402
from runtime.bench.prompts import default_prompts_path, load_prompts  # noqa: E402
from runtime.decoding.autoregressive import prefill  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from workers.cpu_info import cpu_info  # noqa: E402
from workers.kernels import native  # noqa: E402


def onednn_prompt_linear(x, weight, bias, n):
    n = min(n, x.shape[-2])
    head = torch.nn.functional.linear(x[..., :n, :], weight, bias)
    return head if n == x.shape[-2] else torch.cat((head, native.linear(x[..., n:, :], weight, bias)), dim=-2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,512,900")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    config = load_config()
    config.model.dtype, config.runtime.threads = "bfloat16", args.threads
    engine = Engine.from_config(config)
    questions = load_prompts(default_prompts_path(), None, None)
    text = [t for q in questions for t in engine.encode_chat(q.text)]
    kernels = engine.model.kernels
    paths = {"rows": native.prompt_linear, "onednn": onednn_prompt_linear}
    if native.use_amx(True):
        paths = {"amx": native.prompt_linear, **paths}
    results = []
    with torch.inference_mode():
        for n in (int(x) for x in args.lengths.split(",")):
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.repeats):
                for name, fn in paths.items():  # taking turns: the machine's noise falls on each alike
                    native.use_amx(name == "amx")
                    object.__setattr__(kernels, "prompt_linear", fn)  # Kernels is frozen: this script swaps the path
                    engine.cache.truncate(0)
                    t0 = time.perf_counter()
                    prefill(engine.model, engine.cache, text[:n])
                    times[name].append(1000 * (time.perf_counter() - t0))
            row = {"prompt": n, **{name: round(sorted(ts)[len(ts) // 2], 1) for name, ts in times.items()}}
            results.append(row)
            print(json.dumps(row), flush=True)
    native.use_amx(True)
    if args.out:
        report = {"cpu": cpu_info(), "threads": args.threads, "dtype": "bfloat16", "median_ms": results}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""t(n) for small trees, the minimum over rounds: `python scripts/small_rows.py --dtype bfloat16 --threads 1`.

Rounds of workers.cost_curve.step_times (a chain of n rows after --context cached
positions, 3 timed runs each); the minimum of all rounds per n, which a busy machine
disturbs least. Prints {n: ms}.
"""

from __future__ import annotations

import argparse

import torch

from configs.schema import ModelConfig
from runtime.engine import Engine
from workers.cost_curve import step_times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,3,4,5,6,8,12,16")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(ModelConfig(dtype=args.dtype, device="cpu", max_context=1024))
    rows = [int(n) for n in args.rows.split(",")]
    best = {n: float("inf") for n in rows}
    for _ in range(args.rounds):
        _, fastest = step_times(engine, rows, args.context, 3)
        best = {n: min(best[n], fastest[n]) for n in rows}
    print({n: round(ms, 2) for n, ms in best.items()})


if __name__ == "__main__":
    main()

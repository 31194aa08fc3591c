"""The latency model (runtime.pipeline.latency_model) against measured pipelined runs,
recomputed with today's model on this device's curve: each run's measured decode-phase
latency and compute per token next to the model's, with the wasted-step fraction read
from the run and, for comparison, the whole-step charge of the earlier model.

    python scripts/model_against_runs.py docs/bench/issue16-validate-more/sweep.json \
        docs/bench/issue16-local-transport-bf16.json

A sweep.json (`leapfrog sweep`) gives its points; a `leapfrog bench` JSON of `--threads 1` is taken as
one chain point of `--bench-workers` workers with predictions read at launch (the
defaults it ran with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from configs.schema import DrafterConfigs, ModelConfig  # noqa: E402
from runtime.bench.sweep import decode_stats  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.pipeline.latency_model import predict  # noqa: E402


def points(path: str, bench_workers: int) -> list[tuple[dict, dict]]:
    data = json.loads(Path(path).read_text())
    if "results" in data:
        return [(r["point"], r) for r in data["results"]]
    return [({"workers": bench_workers, "policy": "chain", "predict_layer": 0, "run": Path(path).name}, data)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="sweep.json or bench JSON files with a pipelined mode")
    p.add_argument("--threads", type=int, default=1, help="the workers' torch threads (the curve to read)")
    p.add_argument("--bench-workers", type=int, default=2, help="the workers of a `leapfrog bench` JSON's pipelined run")
    args = p.parse_args()
    engine = Engine(ModelConfig(dtype="bfloat16", device="cpu"), DrafterConfigs())
    curve = engine.cost_curve(args.threads)
    for path in args.runs:
        for point, result in points(path, args.bench_workers):
            stats = decode_stats(result["modes"]["pipeline"]["workers"], point, result, curve)
            cost = curve.at(stats.context)
            now, whole = predict(stats, cost), predict(dataclasses.replace(stats, wasted_fraction=1.0), cost)
            err = lambda model, measured: f"{100 * (model / measured - 1):+.1f}%"  # noqa: E731
            print(f"{point}: wasted fraction {stats.wasted_fraction:.2f}; latency {stats.latency_ms:.2f} ms a token, "
                  f"model {now.latency_ms:.2f} ({err(now.latency_ms, stats.latency_ms)}); compute {stats.worker_ms:.2f}, "
                  f"model {now.worker_ms:.2f} ({err(now.worker_ms, stats.worker_ms)}), whole-step charge "
                  f"{whole.worker_ms:.2f} ({err(whole.worker_ms, stats.worker_ms)})")


if __name__ == "__main__":
    main()

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
from runtime.pipeline.latency_model import needed_hit_rate, predict  # noqa: E402


def points(path: str, bench_workers: int) -> list[tuple[dict, dict]]:
    data = json.loads(Path(path).read_text())
    if "results" in data:
        return [(r["point"], r) for r in data["results"]]
    return [({"workers": bench_workers, "policy": "chain", "predict_layer": 0, "run": Path(path).name}, data)]


def fmt(rate: float | None) -> str:
    return "none below 0.99" if rate is None else f"{rate:.0%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="sweep.json or bench JSON files with a pipelined mode")
    p.add_argument("--threads", type=int, default=1, help="the workers' torch threads (the curve to read)")
    p.add_argument("--bench-workers", type=int, default=2, help="the workers of a `leapfrog bench` JSON's pipelined run")
    p.add_argument("--single", default="ht", help="the single-worker mode of the same run to compare against")
    args = p.parse_args()
    engine = Engine(ModelConfig(dtype="bfloat16", device="cpu"), DrafterConfigs())
    curve = engine.cost_curve(args.threads)
    for path in args.runs:
        for point, result in points(path, args.bench_workers):
            stats = decode_stats(result["modes"]["pipeline"]["workers"], point, result, curve)
            cost = curve.at(stats.context)
            now, whole = predict(stats, cost), predict(dataclasses.replace(stats, wasted_fraction=1.0), cost)
            err = lambda model, measured: f"{100 * (model / measured - 1):+.1f}%"  # noqa: E731
            print(f"{point}: launch rate {stats.launch_rate:.2f}, hit rate {stats.hit_rate:.2f}, wasted fraction "
                  f"{stats.wasted_fraction:.2f}; latency {stats.latency_ms:.2f} ms a token, model {now.latency_ms:.2f} "
                  f"({err(now.latency_ms, stats.latency_ms)}); compute {stats.worker_ms:.2f}, model {now.worker_ms:.2f} "
                  f"({err(now.worker_ms, stats.worker_ms)}), whole-step charge {whole.worker_ms:.2f} "
                  f"({err(whole.worker_ms, stats.worker_ms)})")
            one = result["modes"].get(args.single)
            if one is None:
                continue
            one_ms = 1000 * one["latency_per_token_s"]
            for s in (stats.launch_rate, 1.0):  # as measured, and a launch on every step
                at = dataclasses.replace(stats, launch_rate=s)
                need = [needed_hit_rate(at, cost, one_ms / gain) for gain in (1.0, 1.2)]
                print(f"    launch rate {s:.2f}: hit rate needed to match `{args.single}` ({one_ms:.2f} ms a token) "
                      f"{fmt(need[0])}, to be 1.2x faster {fmt(need[1])}")


if __name__ == "__main__":
    main()

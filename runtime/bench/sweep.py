"""Latency/compute sweeps of the pipelined modes (`leapfrog sweep --config F --out DIR`).

The config file is a Leapfrog config (its sections are the base settings) plus a [sweep]
section. Every list in [sweep] is a grid axis; the run covers their product:

    [sweep]
    modes = ["pipeline", "async"]      # multi-worker modes run at every grid point
    references = ["ht"]                # single-worker modes run next to them (ar always runs)
    per_category = 1                   # Spec-Bench prompts per category (or `limit`)
    dtype = ["bfloat16"]               # axes: dtype, workers, policy, predict_layer,
    workers = [2, 3]                   #   alternatives, continuation_budget, budget
    policy = ["chain", "fanout"]       #   (ht tree nodes), depth (ht draft depth),
    ht_weights = ["default"]           #   ht_weights (the transfer layer is the weights')

Each grid point runs through the benchmark harness (runtime.bench.harness: modes interleaved
prompt by prompt, checked against ar), so every ratio in a row comes from one run. It
writes DIR/sweep.csv (a row per point and mode), DIR/sweep.json (the full results) and
DIR/sweep.png: latency per token against compute per token (busy worker-seconds per
token), with the Pareto frontier (no other point is both faster and cheaper) marked.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import sys
from pathlib import Path

from tqdm import tqdm

from configs.files import config_from_dict, read_toml
from configs.schema import ConfigError, LeapfrogConfig
from runtime.bench.charts import pareto_chart
from runtime.bench.harness import NEAR_TIE_TOL, run_bench
from runtime.bench.prompts import default_prompts_path, load_prompts
from runtime.engine import Engine
from runtime.modes import UnknownModeError, check_mode
from runtime.pipeline.cluster import ensure_ray
from runtime.pipeline.latency_model import DecodeStats, needed_hit_rate, predict
from workers.cpu_info import cpu_info
from workers.tree_sizing import CostCurve

AXES = {  # grid axis -> (section of LeapfrogConfig, field)
    "dtype": ("model", "dtype"),
    "workers": ("pipeline", "workers"),
    "policy": ("pipeline", "policy"),
    "predict_layer": ("pipeline", "predict_layer"),
    "alternatives": ("pipeline", "alternatives"),
    "continuation_budget": ("pipeline", "continuation_budget"),
    "budget": ("ht", "budget"),
    "depth": ("ht", "depth"),
    "ht_weights": ("ht", "weights"),
}
SETTINGS = {"modes": ["pipeline"], "references": ["ht"], "per_category": None, "limit": None}
CSV_FIELDS = [
    "point", *AXES, "mode", "tokens", "tokens_per_s", "speedup_vs_ar", "latency_ms_per_token",
    "worker_ms_per_token", "tau", "identical_prompts", "prompts", "hit_rate", "wasted_steps", "faults", "pareto",
    # The decode phase (after the prompt's step) of a pipelined mode, measured and as the
    # latency model (runtime.pipeline.latency_model) predicts it from this device's t(n).
    "decode_latency_ms", "model_latency_ms", "decode_worker_ms", "model_worker_ms",
]
PROJECTED_FIELDS = [
    "point", *AXES, "mode", "measured_workers", "hit_rate", "tau_root", "tau_hit", "root_rows", "spawned_rows",
    "latency_ms_per_token", "worker_ms_per_token", "needed_hit_rate", "pareto",
]


@dataclasses.dataclass
class Sweep:
    base: LeapfrogConfig
    grid: dict[str, list]
    modes: list[str]
    references: list[str]
    per_category: int | None
    limit: int | None

    def points(self) -> list[dict]:
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]

    def config_at(self, point: dict) -> LeapfrogConfig:
        config = dataclasses.replace(
            self.base, model=dataclasses.replace(self.base.model), pipeline=dataclasses.replace(self.base.pipeline),
            drafters=dataclasses.replace(self.base.drafters, ht=dataclasses.replace(self.base.drafters.ht)),
        )
        for axis, value in point.items():
            section, key = AXES[axis]
            setattr(config.drafters.ht if section == "ht" else getattr(config, section), key, value)
        return config.validate()


def load_sweep(path: str | Path) -> Sweep:
    data = read_toml(Path(path))
    spec = dict(data.pop("sweep", None) or {})
    if not spec:
        raise ConfigError(f"{path} has no [sweep] section")
    settings = {key: spec.pop(key, default) for key, default in SETTINGS.items()}
    unknown = set(spec) - set(AXES)
    if unknown:
        raise ConfigError(f"[sweep]: unknown keys {sorted(unknown)}; axes: {sorted(AXES)}, settings: {sorted(SETTINGS)}")
    grid = {axis: value if isinstance(value, list) else [value] for axis, value in spec.items()}
    if any(not values for values in grid.values()):
        raise ConfigError("[sweep]: every axis needs at least one value")
    for mode in settings["modes"] + settings["references"]:
        try:
            check_mode(mode)
        except UnknownModeError as e:
            raise ConfigError(f"[sweep]: {e}") from None
    sweep = Sweep(config_from_dict(data, str(path)), grid, settings["modes"], settings["references"],
                  settings["per_category"], settings["limit"])
    for point in sweep.points():  # every point's settings are valid before anything runs
        sweep.config_at(point)
    return sweep


def run_sweep(sweep: Sweep, out: str | Path, progress: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(default_prompts_path(), sweep.limit, sweep.per_category)
    rows, results, engines = [], [], {}
    points = sweep.points()
    if sweep.modes and sweep.base.pipeline.transport == "ray":  # room for the largest grid point's workers
        ensure_ray(max(sweep.config_at(point).pipeline.workers for point in points))
    bar = tqdm(points, desc="sweep", unit="point", disable=not progress, file=sys.stderr)
    for index, point in enumerate(bar):
        bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in point.items()))
        config = sweep.config_at(point)
        dtype = config.model.dtype
        if dtype not in engines:
            for other in engines.values():  # one engine (and its workers) at a time
                other.close()
            engines = {dtype: Engine.from_config(config)}
        engine = engines[dtype]
        engine.set_drafter_config("ht", config.drafters.ht)
        engine.set_pipeline_config(config.pipeline)
        result = run_bench(engine, prompts, sweep.references + sweep.modes, config.generation.max_new_tokens,
                           NEAR_TIE_TOL[dtype], config.runtime.threads, progress=False, sampling=config.sampling)
        result["point"], result["settings"], result["layers"] = point, settings(config), engine.model.args.n_layers
        results.append(result)
        rows += csv_rows(index, settings(config), result, engine.cost_curve(config.pipeline.threads))
    for engine in engines.values():
        engine.close()
    mark_pareto(rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.json").write_text(json.dumps({"cpu": cpu_info(), "grid": sweep.grid, "results": results}, indent=1))
    pareto_chart(rows, out / "sweep.png", title=chart_title(results[0]))
    return out


def settings(config: LeapfrogConfig) -> dict:
    """Every axis's value at a point (the grid's, or the base config's)."""
    return {axis: getattr(config.drafters.ht if s == "ht" else getattr(config, s), key) for axis, (s, key) in AXES.items()}


def decode_stats(workers: dict, point: dict, result: dict, own: CostCurve | None = None) -> DecodeStats | None:
    """The latency model's inputs from a point's pipelined run (None without one); with
    `own`, the measuring device's curve, the steps' host work beyond it too."""
    if not workers:
        return None
    layer, layers = point.get("predict_layer", 0), result.get("layers")
    if layer and not layers:
        raise ConfigError("this sweep predates the layer count its predict_layer needs: run it again")
    stats = DecodeStats.from_summary(workers, point["workers"], point["policy"], layer / layers if layer else 0.0)
    if stats is None or own is None:
        return stats
    return DecodeStats.from_summary(workers, point["workers"], point["policy"], stats.predict_fraction, own.at(stats.context))


def csv_rows(index: int, point: dict, result: dict, curve: CostCurve | None = None) -> list[dict]:
    rows = []
    for mode, m in result["modes"].items():
        workers = m.get("workers") or {}
        stats = decode_stats(workers, point, result, curve)
        model = predict(stats, curve.at(stats.context)) if stats and curve else None
        rows.append({
            "point": index, **point, "mode": mode,
            "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"], "speedup_vs_ar": m["speedup_vs_ar"],
            "latency_ms_per_token": round(1000 * m["latency_per_token_s"], 3),
            "worker_ms_per_token": round(1000 * m["worker_s_per_token"], 3), "tau": m["mean_accepted"],
            "identical_prompts": m["identical_to_ar"], "prompts": result["prompts"], "hit_rate": workers.get("hit_rate"),
            "wasted_steps": workers.get("wasted_steps"), "faults": workers.get("faults"), "pareto": False,
            "decode_latency_ms": round(stats.latency_ms, 3) if stats else None,
            "model_latency_ms": round(model.latency_ms, 3) if model else None,
            "decode_worker_ms": round(stats.worker_ms, 3) if stats else None,
            "model_worker_ms": round(model.worker_ms, 3) if model else None,
        })
    return rows


def project_sweep(measured: str | Path, profile: str | Path, out: str | Path, workers: list[int]) -> Path:
    """A measured sweep (its sweep.json) projected onto the device of `profile` (a `leapfrog
    profile` JSON): each pipelined run's acceptance and hit rate with that device's t(n), at
    every worker count in `workers` (runtime.pipeline.latency_model); the single-worker
    worker count 1 is one worker running the run's root steps (a root step is a sized tree
    from the committed tokens, as a single-worker `ht` step is). Writes DIR/projected.csv
    (with the hit rate each point would need to be 1.2x faster than that one worker) and
    DIR/projected.png, the projected Pareto frontier."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = json.loads(Path(measured).read_text())["results"]
        curve = CostCurve.from_profile(json.loads(Path(profile).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot project {measured} onto {profile}: {e}") from None
    rows = []
    for index, result in enumerate(results):
        point = result["settings"]
        for mode, m in result["modes"].items():
            stats = decode_stats(m.get("workers") or {}, point, result)
            if stats is None:
                continue
            cost = curve.at(stats.context)
            one_worker = predict(stats, cost, 1).latency_ms
            for n in workers:
                p = predict(stats, cost, n)
                need = needed_hit_rate(stats, cost, one_worker / 1.2, n) if n > 1 else None
                rows.append({
                    "point": index, **point, "mode": mode, "measured_workers": stats.workers, "workers": n,
                    "hit_rate": round(stats.hit_rate, 4), "tau_root": round(stats.tau_root, 3),
                    "tau_hit": round(stats.tau_hit, 3), "root_rows": round(stats.root_rows, 2),
                    "spawned_rows": round(stats.spawned_rows, 2), "latency_ms_per_token": round(p.latency_ms, 3),
                    "worker_ms_per_token": round(p.worker_ms, 3), "needed_hit_rate": None if need is None else round(need, 4),
                    "pareto": False,
                })
    mark_pareto(rows)
    with open(out / "projected.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROJECTED_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        pareto_chart([{"policy": "", "predict_layer": "", **r} for r in rows], out / "projected.png",
                     title=f"projected onto {Path(profile).name}")
    return out


def mark_pareto(rows: list[dict]) -> None:
    """pareto = no other row has lower-or-equal latency and compute, one of them lower."""
    for row in rows:
        a = (row["latency_ms_per_token"], row["worker_ms_per_token"])
        row["pareto"] = not any(
            (b := (o["latency_ms_per_token"], o["worker_ms_per_token"])) != a and b[0] <= a[0] and b[1] <= a[1] for o in rows
        )


def chart_title(result: dict) -> str:
    return f"{result['model']}, {result['device']}, {result['prompts']} prompts x {result['max_new_tokens']} tokens"

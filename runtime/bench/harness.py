"""Benchmark harness: every mode on the same prompts, side by side, checked against `ar`.

Modes run interleaved prompt by prompt, so that the machine's noise falls on all of them
alike; speedups are ratios of tokens/s measured in the same run. `ar` is the reference
for losslessness and always runs. A divergence is any prompt whose tokens differ from
`ar`'s; it counts as a near tie when `ar`'s margin at the first differing token (the top-2
logit gap, or for sampling the logit change that flips the draw: workers.sampling) was
under the tolerance (a low-precision rounding flip rather than a bug).

With sampling, prompt i is drawn with seed `seed + i` in every mode, so lossless modes
must reproduce `ar`'s sampled tokens; the hf peers sample with transformers' own RNG and
are compared by speed only, as the llama.cpp peers always are (their own arithmetic).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import asdict, fields, replace

from tqdm import tqdm

from configs.schema import SamplingConfig
from runtime.bench.prompts import Prompt
from runtime.decoding.steps import Step
from runtime.pipeline.metrics import Metrics
from workers.cpu_info import cpu_info

REFERENCE = "ar"
WARMUP_TOKENS = 8
# Top-2 logit margin under which a divergence counts as a near tie, by dtype: bfloat16
# rounds logits of this model's magnitude (~10-30) to steps of 0.06-0.125.
NEAR_TIE_TOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


def first_divergence(ref: list[int], out: list[int]) -> int | None:
    """Index of the first token where `out` differs from `ref` (None when identical)."""
    for i, (a, b) in enumerate(zip(ref, out)):
        if a != b:
            return i
    return None if len(ref) == len(out) else min(len(ref), len(out))


def compared_with_ar(mode, sampling: SamplingConfig) -> bool:
    """Whether a mode's tokens are expected to equal ar's: every lossless mode's are; the hf
    peers' only when greedy (they sample with transformers' RNG); llama.cpp's never (its
    own arithmetic, `exact = False`)."""
    return getattr(mode, "exact", True) and (sampling.greedy or getattr(mode, "same_draws_as_ar", True))


def run_once(engine, mode: str, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> dict:
    steps: list[Step] = []
    start = time.perf_counter()
    for step in engine.steps(prompt_ids, mode, max_new_tokens, sampling):
        steps.append(step)
    seconds = time.perf_counter() - start
    return {
        "tokens": [t for s in steps for t in s.tokens],
        "margins": [m for s in steps for m in (s.margins or [])],
        "forward_passes": sum(s.forward_passes for s in steps),
        # Tokens committed by each single-pass decoding step (the first Step is the prefill).
        "step_tokens": [len(s.tokens) for s in steps[1:] if s.forward_passes == 1],
        "seconds": seconds,
        "workers": getattr(engine.mode(mode), "metrics", None),  # multi-worker modes: runtime.pipeline.metrics.Metrics
    }


def run_bench(
    engine,
    prompts: list[Prompt],
    modes: list[str],
    max_new_tokens: int,
    near_tie_tol: float,
    threads: int,
    progress: bool = True,
    sampling: SamplingConfig | None = None,
) -> dict:
    sampling = sampling or SamplingConfig()
    modes = [REFERENCE] + [m for m in modes if m != REFERENCE]
    encoded = [engine.encode_chat(p.text) for p in prompts]
    for ids in encoded:
        engine.check_fits(ids, max_new_tokens)
    for mode in modes:  # build every mode (loads peers' models) and warm it up, untimed
        run_once(engine, mode, encoded[0], WARMUP_TOKENS, sampling)
    seeds = [replace(sampling, seed=sampling.seed + i) for i in range(len(prompts))]

    runs: dict[str, list[dict]] = {m: [] for m in modes}
    bar = tqdm(total=len(prompts) * len(modes), desc="bench", unit="run", disable=not progress, file=sys.stderr)
    for prompt, ids, prompt_sampling in zip(prompts, encoded, seeds):
        for mode in modes:
            bar.set_postfix_str(f"{mode} q{prompt.question_id}")
            runs[mode].append(run_once(engine, mode, ids, max_new_tokens, prompt_sampling))
            bar.update()
    bar.close()
    comparable = {m: compared_with_ar(engine.mode(m), sampling) for m in modes}
    result = summarize(engine, prompts, modes, runs, max_new_tokens, near_tie_tol, threads, comparable)
    result["sampling"] = asdict(sampling)
    for m in modes:
        result["modes"][m]["drafter"] = getattr(engine.mode(m), "drafter_info", None)
    return result


def _tokens(runs: list[dict]) -> int:
    return sum(len(r["tokens"]) for r in runs)


def _tokens_per_s(runs: list[dict]) -> float:
    return _tokens(runs) / sum(r["seconds"] for r in runs)


def _mean_accepted(runs: list[dict]) -> float:
    """Generated tokens per target forward pass (tau)."""
    return _tokens(runs) / sum(r["forward_passes"] for r in runs)


def acceptance_by_depth(runs: list[dict]) -> list[float]:
    """Fraction of decoding steps whose accepted path reached draft depth d, for d = 1, 2, ...

    A step that commits n tokens accepted n - 1 drafts (plus the bonus token). Empty for
    modes that commit one token per step or report no single-pass steps (hf modes).
    """
    sizes = [n for r in runs for n in r["step_tokens"]]
    if not sizes or max(sizes) < 2:
        return []
    return [round(sum(n > d for n in sizes) / len(sizes), 4) for d in range(1, max(sizes))]


def worker_summary(runs: list[dict]) -> dict | None:
    """Pipelined modes: the coordinator's metrics summed over prompts."""
    metrics = [r["workers"] for r in runs if r.get("workers")]
    if not metrics:
        return None
    total = {f.name: sum(m[f.name] for m in metrics) for f in fields(Metrics)}
    per = max(total["tokens"], 1)
    return {
        **total,
        "hit_rate": round(total["hits"] / total["spawned"], 4) if total["spawned"] else None,
        "drafter_hit_rate": round(total["drafter_launches"] / max(total["steps"], 1), 4) if total["drafter_launches"] else None,
        "worker_s_per_token": round(total["worker_s"] / per, 5),
        "forward_s_per_step": round(total["step_s"] / max(total["steps"], 1), 5),
        "forward_s_per_draft": round(total["draft_s"] / total["drafts"], 5) if total["drafts"] else None,
        "transport_s_per_step": round(max(total["round_trip_s"] - total["step_s"], 0) / max(total["steps"], 1), 5),
        "coordinator_s_per_token": round(total["coordinator_s"] / per, 6),
    }


def summarize(engine, prompts, modes, runs, max_new_tokens, near_tie_tol, threads, comparable=None) -> dict:
    """`comparable[mode]` False: the mode's tokens are not expected to equal ar's (sampled hf
    peers); its identity columns are None."""
    comparable = comparable or {}
    ref = runs[REFERENCE]
    ref_by_category = defaultdict(list)
    for prompt, run in zip(prompts, ref):
        ref_by_category[prompt.category].append(run)
    rates = {m: _tokens_per_s(runs[m]) for m in modes}
    result = {
        "model": engine.config.checkpoint,
        "checkpoint_folder": str(engine.folder),
        "dtype": engine.config.dtype,
        "weights": engine.config.weights,
        "device": str(engine.model.device),
        "cpu": cpu_info(),
        "threads": threads,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "near_tie_tol": near_tie_tol,
        "modes": {},
    }
    for mode in modes:
        rows, per_category = [], defaultdict(list)
        checked = comparable.get(mode, True)
        for prompt, run, ref_run in zip(prompts, runs[mode], ref):
            div = first_divergence(ref_run["tokens"], run["tokens"]) if checked else None
            margin = ref_run["margins"][div] if div is not None and div < len(ref_run["margins"]) else None
            rows.append({
                "question_id": prompt.question_id,
                "category": prompt.category,
                "tokens": len(run["tokens"]),
                "seconds": round(run["seconds"], 4),
                "forward_passes": run["forward_passes"],
                "identical_to_ar": div is None if checked else None,
                "first_divergence": div,
                "ar_margin_at_divergence": margin,
                "near_tie": margin is not None and margin < near_tie_tol,
            })
            per_category[prompt.category].append(run)
        divergent = [r for r in rows if r["identical_to_ar"] is False]
        result["modes"][mode] = {
            "tokens": _tokens(runs[mode]),
            "seconds": round(sum(r["seconds"] for r in runs[mode]), 3),
            "tokens_per_s": round(rates[mode], 3),
            "speedup_vs_ar": round(rates[mode] / rates[REFERENCE], 4),
            "speedup_vs_hf": round(rates[mode] / rates["hf"], 4) if "hf" in rates else None,
            "mean_accepted": round(_mean_accepted(runs[mode]), 4),
            "identical_to_ar": len(rows) - len(divergent) if checked else None,
            "divergent": len(divergent) if checked else None,
            "near_tie_divergences": sum(r["near_tie"] for r in divergent) if checked else None,
            "acceptance_by_depth": acceptance_by_depth(runs[mode]),
            "latency_per_token_s": round(1 / rates[mode], 6),
            # Compute: busy worker-seconds per token; a single-worker mode is busy all along.
            "worker_s_per_token": (worker_summary(runs[mode]) or {}).get("worker_s_per_token", round(1 / rates[mode], 6)),
            "workers": worker_summary(runs[mode]),
            "per_category": {
                cat: {
                    "prompts": len(cat_runs),
                    "tokens_per_s": round(_tokens_per_s(cat_runs), 3),
                    "speedup_vs_ar": round(_tokens_per_s(cat_runs) / _tokens_per_s(ref_by_category[cat]), 4),
                    "mean_accepted": round(_mean_accepted(cat_runs), 4),
                }
                for cat, cat_runs in per_category.items()
            },
            "per_prompt": rows,
        }
    return result

"""Engines side by side: the same modes on two or more engines that differ in one setting
(tree sizing on or off, one drafter's weights or another's), in one run.

For each prompt, `ar` and then every mode on each engine, one after the other, so that the
machine's noise falls on all of them alike (the harness's rule, across engines). Each row
is one (mode, engine): tokens/s relative to that engine's own `ar` (the mean of per-prompt
ratios), tokens per step (tau) and how many prompts gave `ar`'s tokens.
Used by scripts/engines_ab.py (tree sizing on/off, the conditional head on/off, two `ht` weights files);
any other one-setting A/B is a dict of engines away.
"""

from __future__ import annotations

import statistics

from runtime.bench.harness import REFERENCE, WARMUP_TOKENS, run_once
from runtime.bench.prompts import Prompt


def compare_engines(engines: dict[str, object], modes: list[str], prompts: list[Prompt], max_new_tokens: int,
                    log=print) -> list[dict]:
    """One row per (mode, engine name), modes in the order given, `ar` first."""
    modes = [REFERENCE, *(m for m in modes if m != REFERENCE)]
    runs = {(name, mode): [] for name in engines for mode in modes}
    first = next(iter(engines.values())).encode_chat(prompts[0].text)
    for engine in engines.values():  # build and warm every mode (and measure t(n) once), untimed
        for mode in modes:
            run_once(engine, mode, first, WARMUP_TOKENS)
    for i, prompt in enumerate(prompts):
        for name, engine in engines.items():
            ids = engine.encode_chat(prompt.text)
            for mode in modes:
                runs[name, mode].append(run_once(engine, mode, ids, max_new_tokens))
        log(f"prompt {i + 1}/{len(prompts)}")
    rows = []
    for mode in modes[1:]:
        for name in engines:
            ar, got = runs[name, REFERENCE], runs[name, mode]
            ratio = statistics.mean(a["seconds"] / len(a["tokens"]) / (g["seconds"] / len(g["tokens"])) for a, g in zip(ar, got))
            steps = [n for g in got for n in g["step_tokens"]]
            rows.append({
                "mode": mode, "engine": name, "speedup_vs_ar": round(ratio, 3), "tau": round(statistics.mean(steps), 3),
                "tokens_per_s": round(sum(len(g["tokens"]) for g in got) / sum(g["seconds"] for g in got), 2),
                "ar_tokens_per_s": round(sum(len(a["tokens"]) for a in ar) / sum(a["seconds"] for a in ar), 2),
                "identical_to_ar": sum(a["tokens"] == g["tokens"] for a, g in zip(ar, got)), "prompts": len(prompts),
            })
            r = rows[-1]
            log(f"{mode:<16} {name:<24}: {r['speedup_vs_ar']:.2f}x ar (mean of per-prompt ratios), tau {r['tau']:.2f}, "
                f"{r['tokens_per_s']:.1f} tok/s (ar {r['ar_tokens_per_s']:.1f}), identical {r['identical_to_ar']}/{len(prompts)}")
    return rows

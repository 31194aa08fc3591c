"""What the benchmark prints: its table (`format_table`), and the one-line speed and
identity reports of `leapfrog generate --compare`."""

from __future__ import annotations

from configs.schema import LeapfrogConfig, SamplingConfig
from runtime.bench.harness import NEAR_TIE_TOL, first_divergence
from runtime.modes import PIPELINED_MODES


def format_table(result: dict) -> str:
    w = max(12, 2 + max(len(mode) for mode in result["modes"]))
    head = (f"{'mode':<{w}}{'tokens':>8}{'tok/s':>9}{'vs ar':>8}{'vs hf':>8}{'tau':>7}{'identical':>11}"
            f"{'divergent (near-tie)':>22}{'draft params':>14}{'trained':>9}")
    sampling = result.get("sampling") or {"temperature": 0.0}
    how = "greedy" if not sampling["temperature"] else (
        f"temperature {sampling['temperature']} top-k {sampling['top_k']} top-p {sampling['top_p']} seed {sampling['seed']}+i"
    )
    lines = [
        f"model {result['model']}  dtype {result['dtype']}  weights {result.get('weights', 'float')}  device {result['device']}  threads {result['threads']}  "
        f"prompts {result['prompts']}  max_new_tokens {result['max_new_tokens']}  {how}",
        *([f"cpu {result['cpu']['model']} ({result['cpu']['class']}: {' '.join(result['cpu']['flags'])})"] if result.get("cpu") else []),
        head,
        "-" * len(head),
    ]
    for mode, m in result["modes"].items():
        vs_hf = f"{m['speedup_vs_hf']:.2f}x" if m["speedup_vs_hf"] is not None else "-"
        if m["identical_to_ar"] is None:  # sampled hf peers (other draws), llama.cpp (other arithmetic)
            identity = f"{'-':>11}{'(not compared)':>22}"
        else:
            identity = f"{m['identical_to_ar']:>7}/{result['prompts']:<3}{m['divergent']:>15} ({m['near_tie_divergences']})"
        drafter = m.get("drafter") or {}
        params = f"{drafter['parameters']:,}" if drafter.get("parameters") else "-"
        trained = f"{drafter['training_s'] / 60:.0f} min" if drafter.get("training_s") else "-"
        lines.append(
            f"{mode:<{w}}{m['tokens']:>8}{m['tokens_per_s']:>9.2f}{m['speedup_vs_ar']:>7.2f}x{vs_hf:>8}"
            f"{m['mean_accepted']:>7.2f}{identity}{params:>14}{trained:>9}"
        )
    for mode, m in result["modes"].items():
        w = m.get("workers")
        if w:
            hits = f"{w['hit_rate']:.0%}" if w["hit_rate"] is not None else "-"
            lines.append(
                f"{mode}: {w['steps']} steps, {w['spawned']} on predictions (hit {hits}), {w['wasted_steps']} wasted "
                f"({w['wasted_tokens']} tree tokens); per step: forward {1000 * w['forward_s_per_step']:.1f} ms, "
                f"transport {1000 * w['transport_s_per_step']:.1f} ms; "
                + (f"{w['drafts']} drafter calls of {1000 * w['forward_s_per_draft']:.1f} ms; " if w["drafts"] else "")
                + (f"the drafter's tree ready for {w['drafter_hit_rate']:.0%} of steps; " if w.get("drafter_hit_rate") else "")
                + f"coordinator {1000 * w['coordinator_s_per_token']:.2f} ms/token; "
                f"{w['worker_s_per_token'] * 1000:.1f} worker-ms/token; faults {w['faults']}"
            )
    for mode, m in result["modes"].items():
        if m.get("acceptance_by_depth"):
            depths = "  ".join(f"d{d}: {rate:.2f}" for d, rate in enumerate(m["acceptance_by_depth"], 1))
            lines.append(f"{mode}: steps reaching draft depth  {depths}")
    return "\n".join(lines)


def describe_threads(mode: str, config: LeapfrogConfig) -> str:
    p = config.pipeline
    if mode in PIPELINED_MODES:
        return f"{p.workers} workers x {p.threads} thread{'s' * (p.threads > 1)} ({p.transport})"
    n = config.runtime.threads
    return f"{n} thread{'s' * (n != 1)}"


def describe_sampling(sampling: SamplingConfig) -> str:
    if sampling.greedy:
        return "greedy"
    return f"temperature {sampling.temperature}, top-k {sampling.top_k}, top-p {sampling.top_p}, seed {sampling.seed}"


def describe_difference(ref: list[int], ref_margins: list[float], out: list[int], dtype: str) -> str:
    """'identical', or where `out` first differs from `ref` and the reference's margin there
    (workers.sampling), flagged as a near tie when it is under the dtype's tolerance."""
    at = first_divergence(ref, out)
    if at is None:
        return "identical"
    if at >= len(ref_margins):
        return f"differs from token {at} on"
    margin, tol = ref_margins[at], NEAR_TIE_TOL[dtype]
    kind = f"a {dtype} near tie, < {tol}" if margin < tol else f"NOT a near tie, >= {tol}"
    return f"differs from token {at} on (margin there {margin:.4f} logits: {kind})"


def speed_line(tokens: int, seconds: float, passes: int) -> str:
    return f"{tokens} tokens in {seconds:.2f}s: {tokens / seconds:.1f} tokens/s, {tokens / passes:.2f} tokens per forward pass"

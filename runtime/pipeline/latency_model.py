"""What N pipelined workers buy: latency and compute per token, predicted from one device's
step cost t(n), the drafts' acceptance and the predictions' hit rate (PPD's latency model,
for our coordinator: runtime.pipeline.coordinator).

The decode phase of a reply (after the prompt's step) is a run of cycles. A cycle starts
with a root step, launched on no prediction, from the committed tokens; every other
worker is then busy with a step spawned on the prediction of a step in flight. A spawned
step whose prediction holds (probability h, the hit rate) commits tau_hit tokens and keeps
the chain going; the first one whose prediction fails ends the cycle, and with it every
step chained after it is wasted. Per cycle, with N workers:

    chain:   hits = h / (1 - h)            wasted = N - 1
    fanout:  the N - 1 steps spawned on one parent are its alternatives: a = P(one of
             them holds) = min((N - 1) h, 0.99); hits = a / (1 - a),
             wasted = (N - 2) hits + (N - 1)
    tokens   = tau_root + hits * tau_hit
    work     = T(root rows) + (hits + wasted) * T(spawned rows),   T(n) = t(n) + overhead

All N workers are busy all the time (the coordinator launches on every free worker while a
prediction is pending, which with drafts-based predictions is always), so

    worker-seconds per token = work / tokens        latency per token = work / (N tokens)

and one worker alone, whose steps of rows1 commit tau1 tokens, has latency T(rows1) / tau1.
A second worker pays for itself when latency(N) < latency(1): on this CPU each launch
carries a trunk and its continuation (more rows than a single-worker tree), so it needs a
hit rate `needed_hit_rate` finds. `DecodeStats.from_summary` reads the inputs from a
measured run (the benchmark's pipelined metrics); predictions are validated against the
same runs' measured decode-phase figures (docs/results.md), and `leapfrog sweep --project
PROFILE` projects them onto another device's t(n).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.tree_sizing import StepCost

MAX_ANY_HIT = 0.99  # fanout: a cycle never goes on forever


@dataclass(frozen=True)
class DecodeStats:
    """A pipelined run's decode phase, per step."""

    workers: int
    policy: str  # chain | fanout
    root_rows: float  # rows of a root step at their cost (pseudo states at their share)
    spawned_rows: float
    tau_root: float  # tokens a root step commits
    tau_hit: float  # tokens a spawned step commits when its prediction holds
    hit_rate: float
    overhead_ms: float  # per step: transport and coordinator, beyond the worker's forward
    context: int  # committed tokens at a decode step, on average (which t(n) of a profile applies)
    # What the run measured in its decode phase (None when not from a run):
    latency_ms: float | None = None
    worker_ms: float | None = None

    @classmethod
    def from_summary(cls, workers: dict, n_workers: int, policy: str) -> DecodeStats | None:
        """From the benchmark's summed pipelined metrics (runtime.bench.harness.worker_summary);
        None when the run has no decode steps of both kinds to read."""
        w = workers
        if not w.get("root_steps") or not w.get("spawned_steps") or not w.get("spawned"):
            return None
        decode_tokens = w["tokens"] - w["first_tokens"]
        completed = w["root_steps"] + w["spawned_steps"]
        overhead = (w["round_trip_s"] - w["step_s"]) / max(w["steps"], 1) + w["coordinator_s"] / max(completed, 1)
        return cls(
            workers=n_workers, policy=policy,
            root_rows=w["root_rows"] / w["root_steps"], spawned_rows=w["spawned_rows"] / w["spawned_steps"],
            tau_root=w["root_tokens"] / w["root_steps"], tau_hit=w["spawned_tokens"] / max(w["hits"], 1),
            hit_rate=w["hits"] / w["spawned"], overhead_ms=1000 * max(overhead, 0.0),
            context=round(w["decode_context"] / completed),
            latency_ms=1000 * (w["wall_s"] - w["first_s"]) / max(decode_tokens, 1),
            worker_ms=1000 * (w["step_s"] - w["first_step_s"]) / max(decode_tokens, 1),
        )


@dataclass(frozen=True)
class Projection:
    latency_ms: float  # per token
    worker_ms: float  # busy worker time per token
    hits_per_cycle: float
    wasted_per_cycle: float


def predict(stats: DecodeStats, cost: StepCost, workers: int | None = None, hit_rate: float | None = None) -> Projection:
    """Latency and compute per token of `stats`' run on a device of step cost `cost`, with
    `workers` workers and hit rate `hit_rate` (the run's own where not given)."""
    n = workers or stats.workers
    h = min(max(stats.hit_rate if hit_rate is None else hit_rate, 0.0), MAX_ANY_HIT)
    if n < 2:
        return single_worker(cost, stats.root_rows, stats.tau_root)  # in-process: no transport
    if stats.policy == "fanout":
        any_hit = min((n - 1) * h, MAX_ANY_HIT)
        hits = any_hit / (1 - any_hit)
        wasted = (n - 2) * hits + (n - 1)
    else:
        hits, wasted = h / (1 - h), n - 1
    step = lambda rows: cost(rows) + stats.overhead_ms  # noqa: E731
    tokens = stats.tau_root + hits * stats.tau_hit
    work = step(stats.root_rows) + (hits + wasted) * step(stats.spawned_rows)
    return Projection(work / (n * tokens), work / tokens, hits, wasted)


def single_worker(cost: StepCost, rows: float, tau: float, overhead_ms: float = 0.0) -> Projection:
    """One worker: steps of `rows` rows that commit `tau` tokens each."""
    per_token = (cost(rows) + overhead_ms) / tau
    return Projection(per_token, per_token, 0.0, 0.0)


def needed_hit_rate(stats: DecodeStats, cost: StepCost, target_latency_ms: float, workers: int | None = None) -> float | None:
    """The smallest hit rate at which `stats`' run reaches `target_latency_ms` per token on
    `cost` (bisection: latency falls as the hit rate rises); None when no hit rate below
    MAX_ANY_HIT does."""
    reach = lambda h: predict(stats, cost, workers, h).latency_ms <= target_latency_ms  # noqa: E731
    if reach(0.0):
        return 0.0
    if not reach(MAX_ANY_HIT):
        return None
    low, high = 0.0, MAX_ANY_HIT
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if reach(mid) else (mid, high)
    return high


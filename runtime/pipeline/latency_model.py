"""What N pipelined workers buy: latency and compute per token, predicted from one device's
step cost t(n), the drafts' acceptance and the predictions' hit rate (PPD's latency model,
for our coordinator: runtime.pipeline.coordinator).

The decode phase of a reply (after the prompt's step) is a run of cycles. A cycle starts
with a root step, launched on no prediction, from the committed tokens; a step in flight
launches a child on its prediction, on another worker, with probability s (the launch
rate: it launches none when no draft is confident enough). A spawned step whose
prediction holds (probability h, the hit rate) commits tau_hit tokens and keeps the chain
going; a step that launches nothing ends the cycle, and so does the first launch whose
prediction fails, wasting it and every step chained after it. Per cycle, with N workers
and p = h (chain) or, fanout, p = P(one of the N - 1 alternatives spawned on one parent
holds) = min((N - 1) h, 0.99):

    hits = s p / (1 - s p)      miss = s (1 - p) / (1 - s p)   (the cycles that end on a miss)
    chain:   wasted = (N - 1) miss
    fanout:  wasted = (N - 2) hits + (N - 1) miss
    tokens   = tau_root + hits * tau_hit

A step computes for C(n) = t(n) + host (its host work: building, accepting, drafting,
beyond the forward that t(n) times) and takes T(n) = C(n) + overhead (transport and
coordinator) of a worker's time line. Latency follows the cycle's critical path. Step 0 (the root) starts at 0; step k, spawned
on step k - 1's prediction, starts when that prediction is out (a fraction f of the
parent's step: f = predict_layer / layers, 0 for drafts read at launch; plus the overhead)
and a worker is free: the one that ran step k - N (chain: workers take turns), or for
fanout the N - 1 that ran level k - 2's step and level k - 1's wrong alternatives:

    start(k) = max(end(k - back), start(k - 1) + f T(k - 1) + overhead),  back = N (chain), 2 (fanout)

A cycle with m hits ends when step m does (it launched nothing, or its end shows step
m + 1's prediction wrong), so P(m) = (1 - s p) (s p)^m and

    latency per token = E[end(m)] / E[tau_root + m tau_hit]

while wasted steps run beside the chain on the other workers and compute a fraction w of
a whole step (an abort that lands in time cuts a step between layers; one that lands late
finds it done). Compute:

    worker-seconds per token = (C(root rows) + hits C(spawned rows) + wasted w C(spawned rows)) / tokens

s and w come from the run (`DecodeStats.from_summary`: s = launches per step that
committed, a launch being the N - 1 alternatives under fanout; w = the compute of all but
the first, root and hit steps, per wasted step, against a returned spawned step's); 1 where
unknown. Measured on this CPU: s = 0.60-0.73 with predictions read at launch and 0.94 with
predictions after 20 of 30 layers; w = 0.91-1.06 (wasted steps cost about a whole step).

(Taking every worker busy all the time, latency = work / (N tokens) read 23-32% low once
steps got faster than the transport and launch delays around them, and t(n) alone without
the steps' host work: docs/results.md.)
One worker alone, whose steps of rows1 commit tau1 tokens, has latency T(rows1) / tau1.
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
    overhead_ms: float  # per step: transport and coordinator, beyond the worker's compute
    context: int  # committed tokens at a decode step, on average (which t(n) of a profile applies)
    predict_fraction: float = 0.0  # how far into a step its prediction is out (predict_layer / layers)
    host_ms: float = 0.0  # per step: the workers' compute beyond t(n) (0: unknown)
    wasted_fraction: float = 1.0  # a wasted step's compute against a completed spawned step's (1: unknown)
    launch_rate: float = 1.0  # of the steps that commit, the share that launched a child on a prediction (1: unknown)
    # What the run measured in its decode phase (None when not from a run):
    latency_ms: float | None = None
    worker_ms: float | None = None

    @classmethod
    def from_summary(cls, workers: dict, n_workers: int, policy: str, predict_fraction: float = 0.0,
                     own_cost: StepCost | None = None) -> DecodeStats | None:
        """From the benchmark's summed pipelined metrics (runtime.bench.harness.worker_summary);
        None when the run has no decode steps of both kinds to read. With `own_cost`, the
        measuring device's t(n), the steps' host work is their measured compute beyond it."""
        w = workers
        if not w.get("root_steps") or not w.get("spawned_steps") or not w.get("spawned"):
            return None
        decode_tokens = w["tokens"] - w["first_tokens"]
        completed = w["root_steps"] + w["spawned_steps"]
        root_rows, spawned_rows = w["root_rows"] / w["root_steps"], w["spawned_rows"] / w["spawned_steps"]
        host = 0.0
        if own_cost is not None:  # measured compute a step, less what t(n) says of its rows
            forward = own_cost(root_rows) * w["root_steps"] + own_cost(spawned_rows) * w["spawned_steps"]
            host = max(1000 * (w["root_step_s"] + w["spawned_step_s"]) - forward, 0.0) / completed
        overhead = (w["round_trip_s"] - w["step_s"]) / max(w["steps"], 1) + w["coordinator_s"] / max(completed, 1)
        wasted_fraction = 1.0
        if w.get("wasted_steps") and w.get("spawned_step_s"):
            # A wasted step that ran to its end is among the spawned steps that returned tokens;
            # one aborted in time returned none. Their compute: all but the first step's, the
            # root steps' and the hits' (at a returned spawned step's mean).
            spawned_ms = w["spawned_step_s"] / w["spawned_steps"]
            wasted_s = w["step_s"] - w["first_step_s"] - w["root_step_s"] - w["hits"] * spawned_ms
            wasted_fraction = max(wasted_s / w["wasted_steps"], 0.0) / spawned_ms
        alternatives = n_workers - 1 if policy == "fanout" else 1  # steps spawned on one prediction
        launch_rate = min(w["spawned"] / alternatives / (w["root_steps"] + w["hits"]), 1.0)
        return cls(
            workers=n_workers, policy=policy,
            root_rows=root_rows, spawned_rows=spawned_rows,
            tau_root=w["root_tokens"] / w["root_steps"], tau_hit=w["spawned_tokens"] / max(w["hits"], 1),
            hit_rate=w["hits"] / w["spawned"], overhead_ms=1000 * max(overhead, 0.0),
            context=round(w["decode_context"] / completed), predict_fraction=predict_fraction, host_ms=host,
            wasted_fraction=wasted_fraction, launch_rate=launch_rate,
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
        return single_worker(cost, stats.root_rows, stats.tau_root, host_ms=stats.host_ms)  # in-process: no transport
    holds = min((n - 1) * h, MAX_ANY_HIT) if stats.policy == "fanout" else h  # a launch's prediction holds
    go_on = stats.launch_rate * holds
    hits = go_on / (1 - go_on)
    on_a_miss = stats.launch_rate * (1 - holds) / (1 - go_on)  # of the cycles, those that end on a miss
    wasted = (n - 2) * hits + (n - 1) * on_a_miss if stats.policy == "fanout" else (n - 1) * on_a_miss
    wall, tokens, compute = cycle_path(cost(stats.root_rows) + stats.host_ms, cost(stats.spawned_rows) + stats.host_ms,
                                       stats, n, holds)
    return Projection(wall / tokens, compute / tokens, hits, wasted)


def cycle_path(root_ms: float, spawned_ms: float, stats: DecodeStats, n: int, holds: float) -> tuple[float, float, float]:
    """E[a cycle's wall time], E[tokens it commits] and E[its steps' compute] (the module's
    docstring), for steps computing root_ms and spawned_ms; step k of the cycle launches a
    child with probability stats.launch_rate, whose prediction holds with probability
    `holds` (the cycle goes on) or not (its launches are wasted)."""
    fanout, o, f = stats.policy == "fanout", stats.overhead_ms, stats.predict_fraction
    back = 2 if fanout else n
    alternatives = n - 1 if fanout else 1  # steps launched on one parent's prediction
    wasted_ms = stats.wasted_fraction * spawned_ms
    launch = stats.launch_rate
    go_on = launch * holds
    starts, ends = [0.0], [root_ms + o]
    wall = tokens = compute = 0.0
    done = root_ms  # compute of the cycle's steps that committed, up to step m
    reach = 1.0  # P(the cycle reaches step m)
    m = 0
    while True:
        start = max(ends[m + 1 - back] if m + 1 >= back else 0.0, starts[m] + f * (ends[m] - starts[m]) + o)
        # the miss: step m + 1's launches (fanout: all its alternatives; chain: it and the N - 2 chained on it)
        wasted = (alternatives if fanout else n - 1) * wasted_ms
        ends_here = reach * (1 - go_on)
        wall += ends_here * ends[m]
        tokens += ends_here * (stats.tau_root + m * stats.tau_hit)
        compute += ends_here * done + reach * launch * (1 - holds) * wasted
        reach *= go_on
        if reach < 1e-9:
            return wall + reach * ends[m], tokens + reach * (stats.tau_root + m * stats.tau_hit), compute + reach * done
        done += spawned_ms + (alternatives - 1) * wasted_ms  # the hit, and fanout's wrong alternatives beside it
        starts.append(start)
        ends.append(start + spawned_ms + o)
        m += 1


def single_worker(cost: StepCost, rows: float, tau: float, overhead_ms: float = 0.0, host_ms: float = 0.0) -> Projection:
    """One worker: steps of `rows` rows that commit `tau` tokens each."""
    per_token = (cost(rows) + host_ms + overhead_ms) / tau
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


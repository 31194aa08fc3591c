"""What the coordinator measures per reply (runtime.pipeline.coordinator); `summary()` gives
the rates the benchmark and the sweep report, and runtime.pipeline.latency_model reads
the decode-phase figures (everything after the first commit, the prompt's step)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Metrics:
    """Per request; `summary()` gives the rates the benchmark and sweep report."""

    tokens: int = 0
    steps: int = 0
    spawned: int = 0  # steps launched on a prediction of a step in flight
    hits: int = 0  # ... that committed tokens (the prediction held)
    wasted_steps: int = 0  # steps that committed nothing (stale, aborted or beaten)
    wasted_tokens: int = 0  # tree nodes those steps ran
    forward_tokens: int = 0  # tree nodes and catch-up tokens all steps ran
    worker_s: float = 0.0  # compute inside the workers: step_s + draft_s
    step_s: float = 0.0  # ... in verifying steps
    draft_s: float = 0.0  # ... in the asynchronous drafter's calls
    drafts: int = 0
    drafter_launches: int = 0  # verifying steps whose tree the drafter's tree started (async with a draft model)
    round_trip_s: float = 0.0  # launch to result, summed over steps
    coordinator_s: float = 0.0  # building trees and merging results
    faults: int = 0
    wall_s: float = 0.0
    # The first commit (the prompt's step: its catch-up rows are the prompt) ...
    first_s: float = 0.0  # wall time from the request to it
    first_tokens: int = 0
    first_step_s: float = 0.0  # its compute
    # ... and the decode steps after it that ran to the end (aborted ones are in steps only),
    # by kind: root steps (launched on no prediction) and spawned ones.
    root_steps: int = 0
    root_rows: float = 0.0  # rows at their cost (workers.messages.StepResult.rows), summed
    root_step_s: float = 0.0
    root_tokens: int = 0  # committed by root steps
    spawned_steps: int = 0
    spawned_rows: float = 0.0
    spawned_step_s: float = 0.0
    spawned_tokens: int = 0  # committed by spawned steps (hits)
    decode_context: int = 0  # committed tokens at those steps' launches, summed (t(n) depends on it)

    def count_step(self, spawned: bool, rows: float, seconds: float, context: int) -> None:
        """A decode step that ran to the end, launched after `context` committed tokens."""
        self.decode_context += context
        if spawned:
            self.spawned_steps, self.spawned_rows, self.spawned_step_s = (
                self.spawned_steps + 1, self.spawned_rows + rows, self.spawned_step_s + seconds)
        else:
            self.root_steps, self.root_rows, self.root_step_s = self.root_steps + 1, self.root_rows + rows, self.root_step_s + seconds

    def count_tokens(self, n: int, spawned: bool, first: bool, seconds: float) -> None:
        """`n` tokens committed by a step (the first commit's, a spawned step's or a root step's)."""
        self.tokens += n
        if first:
            self.first_tokens, self.first_step_s = n, seconds
        elif spawned:
            self.spawned_tokens += n
        else:
            self.root_tokens += n

    def summary(self) -> dict:
        per = max(self.tokens, 1)
        return {
            **asdict(self),
            "hit_rate": self.hits / self.spawned if self.spawned else None,
            # async with a draft model: steps that found the drafter's tree below the committed root
            "drafter_hit_rate": self.drafter_launches / self.steps if self.drafter_launches else None,
            "worker_s_per_token": self.worker_s / per,
            "latency_per_token_s": self.wall_s / per,
            "transport_s_per_step": max(self.round_trip_s - self.step_s, 0.0) / max(self.steps, 1),
        }

"""What the coordinator measures per reply (runtime.pipeline.coordinator); `summary()` gives
the rates the benchmark and the sweep report."""

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
    round_trip_s: float = 0.0  # launch to result, summed over steps
    coordinator_s: float = 0.0  # building trees and merging results
    faults: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict:
        per = max(self.tokens, 1)
        return {
            **asdict(self),
            "hit_rate": self.hits / self.spawned if self.spawned else None,
            "worker_s_per_token": self.worker_s / per,
            "latency_per_token_s": self.wall_s / per,
            "transport_s_per_step": max(self.round_trip_s - self.step_s, 0.0) / max(self.steps, 1),
        }

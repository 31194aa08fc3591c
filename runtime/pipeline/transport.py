"""How the coordinator reaches its workers: the same four calls in-process and over Ray.

A Transport holds `size` workers, creates them lazily (`handle(i)`) and replaces one that
failed (`restart(i)`); each worker is reached through a WorkerHandle. Two implement it:
runtime.pipeline.local_transport (threads in this process, one shared replica) and
runtime.pipeline.ray_transport (Ray actors, a replica each).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from workers.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult


class WorkerFailed(RuntimeError):
    """A worker died, hung past the timeout or answered nonsense."""


class WorkerHandle(Protocol):
    def step(self, request: StepRequest) -> AsyncIterator[Prediction | StepResult | None]:
        """The step's Prediction (None when none was asked for), then its StepResult; the
        StepResult alone when the step was aborted before it predicted."""

    async def draft(self, request: DraftRequest) -> DraftResult:
        """The asynchronous drafter's call."""

    async def abort(self, step_id: int) -> None:
        """Stop a step at its next layer (its result comes back with no tokens)."""

    async def health(self) -> dict:
        """The worker's counters; answers while it is busy with a step."""


class Transport(Protocol):
    size: int  # workers
    handles: dict[int, WorkerHandle]  # those created so far
    restarts: int

    async def handle(self, i: int) -> WorkerHandle:
        """Worker i, created (its replica loaded) on first use."""

    async def restart(self, i: int) -> None:
        """Replace worker i with a fresh one."""

    async def close(self) -> None:
        """Stop every worker."""

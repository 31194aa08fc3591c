"""The Ray transport: each worker in a Ray actor with its own replica (workers.ray_worker),
one GPU each where there are GPUs, otherwise one CPU core and one torch thread each,
placed by a placement group packed on one node. Messages cross as msgpack bytes
(workers.messages). Implements runtime.pipeline.transport.Transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from runtime.pipeline.transport import WorkerFailed
from workers.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult, decode, encode
from workers.ray_worker import RayDecodeWorker

PLACEMENT_TIMEOUT_S = 120.0  # a cluster may need to scale up; longer means it lacks the resources


class RayHandle:
    def __init__(self, actor):
        self.actor = actor

    async def step(self, request: StepRequest) -> AsyncIterator[Prediction | StepResult | None]:
        """The Prediction (or None), then the StepResult; the StepResult alone when the
        step was aborted before it predicted."""
        async for ref in self.actor.step.remote(encode(request)):
            data = await ref
            yield decode(data) if data else None

    async def draft(self, request: DraftRequest) -> DraftResult:
        return decode(await self.actor.draft.remote(encode(request)))

    async def abort(self, step_id: int) -> None:
        await self.actor.abort.remote(step_id)

    async def health(self) -> dict:
        return await self.actor.health.remote()


class RayTransport:
    """Ray actors, one per worker. `ray.init` must have run (runtime.pipeline.cluster does it).
    `specs[i]`: worker i's [model] settings, [ht] settings (None: no pseudo-state drafter)
    and the token ids its draft model drafts among (None: all; workers.decode_worker.load_worker)."""

    def __init__(self, specs: list[tuple[dict, dict | None, list[int] | None]], threads: int = 1):
        self.size, self.specs, self.threads = len(specs), specs, threads
        self.gpu = specs[0][0].get("device", "auto") != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
        bundle = {"GPU": 1, "CPU": 1} if self.gpu else {"CPU": 1}
        self.group = placement_group([bundle] * self.size, strategy="PACK")
        self.handles: dict[int, RayHandle] = {}
        self.restarts = 0

    async def handle(self, i: int) -> RayHandle:
        if i not in self.handles:
            await self._placed()
            placement = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
            actor = RayDecodeWorker.options(
                num_cpus=1, num_gpus=1 if self.gpu else 0, scheduling_strategy=placement, name=None
            ).remote(*self.specs[i], self.threads)
            handle = RayHandle(actor)
            try:
                await handle.health()  # the replica is loaded: the first step is not charged for it
            except BaseException:  # it failed, or the caller stopped waiting (a timeout, a cancel)
                ray.kill(actor, no_restart=True)
                raise
            self.handles[i] = handle
        return self.handles[i]

    async def _placed(self) -> None:
        try:
            await asyncio.wait_for(self.group.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerFailed(
                f"Ray could not place {self.size} workers ({self.group.bundle_specs[0]} each) in "
                f"{PLACEMENT_TIMEOUT_S:.0f} s; free now: {ray.available_resources()}"
            ) from None

    async def restart(self, i: int) -> None:
        handle = self.handles.pop(i, None)
        if handle is not None:
            ray.kill(handle.actor, no_restart=True)
        self.restarts += 1
        await self.handle(i)

    async def close(self) -> None:
        for handle in self.handles.values():
            ray.kill(handle.actor, no_restart=True)
        self.handles.clear()
        remove_placement_group(self.group)

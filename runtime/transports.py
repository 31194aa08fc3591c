"""How the coordinator reaches its workers: the same four calls in-process and over Ray.

    handle.step(request)   async iterator: the Prediction (or None), then the StepResult
    handle.draft(request)  -> DraftResult
    handle.abort(step_id)  stop a step early (its result comes back with aborted=True)
    handle.health()        -> dict

A Transport holds `size` workers, creates them lazily (`handle(i)`) and replaces one that
failed (`restart(i)`). LocalTransport runs each worker on its own daemon thread in this
process, sharing one model replica (tests, and a one-process runtime); RayTransport runs
each in a Ray actor with its own replica: one GPU each where there are GPUs, otherwise
one CPU core and one torch thread each, placed by a placement group packed on one node.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable

from runtime.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult, decode, encode
from workers.decode_worker import DecodeWorker, advance


PLACEMENT_TIMEOUT_S = 120.0  # a cluster may need to scale up; longer means it lacks the resources


class WorkerFailed(RuntimeError):
    """A worker died, hung past the timeout or answered nonsense."""


class Lane:
    """A daemon thread that runs submitted calls in order (a hung call strands only it)."""

    def __init__(self, name: str):
        self.calls: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while (call := self.calls.get()) is not None:
            fn, loop, future = call
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(lambda f=future, e=e: f.done() or f.set_exception(e))
            else:
                loop.call_soon_threadsafe(lambda f=future, r=result: f.done() or f.set_result(r))

    def run(self, fn: Callable):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.calls.put((fn, loop, future))
        return future

    def close(self) -> None:
        """The thread ends after the call it is running (a hung one: when that returns)."""
        self.calls.put(None)


class LocalHandle:
    def __init__(self, worker: DecodeWorker, name: str):
        self.worker, self.lane = worker, Lane(name)

    async def step(self, request: StepRequest) -> AsyncIterator[Prediction | StepResult | None]:
        steps = self.worker.step(request)
        first = await self.lane.run(lambda: advance(steps))
        yield first
        if not isinstance(first, StepResult):
            yield await self.lane.run(lambda: advance(steps))

    async def draft(self, request: DraftRequest) -> DraftResult:
        return await self.lane.run(lambda: self.worker.draft(request))

    async def abort(self, step_id: int) -> None:
        self.worker.abort(step_id)

    async def health(self) -> dict:
        return self.worker.health()


class LocalTransport:
    def __init__(self, size: int, make_worker: Callable[[int], DecodeWorker]):
        self.size, self.make_worker = size, make_worker
        self.handles: dict[int, LocalHandle] = {}
        self.restarts = 0

    async def handle(self, i: int) -> LocalHandle:
        if i not in self.handles:
            self.handles[i] = LocalHandle(self.make_worker(i), f"leapfrog-worker-{i}")
        return self.handles[i]

    async def restart(self, i: int) -> None:
        handle = self.handles.pop(i, None)
        if handle is not None:  # a hung thread ends when its call does; a fresh worker takes its place
            handle.lane.close()
        self.restarts += 1
        await self.handle(i)

    async def close(self) -> None:
        for handle in self.handles.values():
            handle.lane.close()
        self.handles.clear()


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
    """Ray actors, one per worker. `ray.init` must have run (runtime.cluster does it)."""

    def __init__(self, size: int, model_config: dict, ht: dict, threads: int = 1):
        import ray
        from ray.util.placement_group import placement_group

        self.size, self.model_config, self.ht, self.threads = size, model_config, ht, threads
        self.gpu = model_config.get("device", "auto") != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
        bundle = {"GPU": 1, "CPU": 1} if self.gpu else {"CPU": 1}
        self.group = placement_group([bundle] * size, strategy="PACK")
        self.handles: dict[int, RayHandle] = {}
        self.restarts = 0

    async def handle(self, i: int) -> RayHandle:
        if i not in self.handles:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            from workers.ray_worker import RayDecodeWorker

            await self._placed()
            placement = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
            actor = RayDecodeWorker.options(
                num_cpus=1, num_gpus=1 if self.gpu else 0, scheduling_strategy=placement, name=None
            ).remote(self.model_config, self.ht, self.threads)
            handle = RayHandle(actor)
            await handle.health()  # the replica is loaded: the first step is not charged for it
            self.handles[i] = handle
        return self.handles[i]

    async def _placed(self) -> None:
        import ray

        try:
            await asyncio.wait_for(self.group.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerFailed(
                f"Ray could not place {self.size} workers ({self.group.bundle_specs[0]} each) in "
                f"{PLACEMENT_TIMEOUT_S:.0f} s; free now: {ray.available_resources()}"
            ) from None

    async def restart(self, i: int) -> None:
        import ray

        handle = self.handles.pop(i, None)
        if handle is not None:
            ray.kill(handle.actor, no_restart=True)
        self.restarts += 1
        await self.handle(i)

    async def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.handles.values():
            ray.kill(handle.actor, no_restart=True)
        self.handles.clear()
        remove_placement_group(self.group)

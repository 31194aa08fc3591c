"""The in-process transport: each worker on its own daemon thread in this process, all
sharing one model replica (tests, and a one-process runtime). Implements
runtime.pipeline.transport.Transport."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable

from workers.decode_worker import DecodeWorker, advance
from workers.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult


class CallThread:
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
        self.worker, self.lane = worker, CallThread(name)

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

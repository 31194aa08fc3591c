"""The pipelined runtime of one Engine: its workers (a transport), the coordinator that
drives them, and the event loop they run on. Modes `pipeline` and `async` share it, so
the replicas (Ray actors holding a core or a GPU each) are created once per engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import asdict

from configs.schema import SamplingConfig
from runtime.decoding.steps import Step
from runtime.pipeline.cluster import ensure_ray
from runtime.pipeline.coordinator import Coordinator
from runtime.pipeline.local_transport import LocalTransport
from runtime.pipeline.transport import Transport
from workers.decode_worker import load_worker


def build_transport(engine) -> Transport:
    """The engine's [pipeline] transport: threads sharing the engine's replica, or Ray actors."""
    c = engine.pipeline
    if c.transport == "local":
        return LocalTransport(c.workers, lambda i: load_worker(engine.config, engine.drafters.ht, model=engine.model))
    from runtime.pipeline.ray_transport import RayTransport  # imports ray

    ensure_ray(c.workers)
    return RayTransport(c.workers, asdict(engine.config), asdict(engine.drafters.ht), c.threads)


class WorkerPool:
    def __init__(self, engine):
        self.engine = engine
        # What can fail comes first: a pool that was never made leaves no loop thread behind.
        self.transport = build_transport(engine)
        self.coordinator = Coordinator(self.transport, engine.pipeline, engine.drafters, engine.model.args.vocab_size)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="leapfrog-coordinator", daemon=True).start()

    def start(self) -> None:
        """Create the workers now (replicas load), so the first reply does not wait for them."""
        self._call(self.coordinator.start_workers())

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def generate(
        self, mode: str, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None
    ) -> Iterator[Step]:
        """The coordinator's async reply as a plain iterator (for Engine.steps)."""
        replies = self.coordinator.generate(prompt_ids, max_new_tokens, self.engine.stop_ids, sampling, mode)

        async def step():
            return await anext(replies, None)

        try:
            while (item := self._call(step())) is not None:
                yield item
        finally:
            self._call(replies.aclose())

    def close(self) -> None:
        self._call(self.coordinator.close())
        self.loop.call_soon_threadsafe(self.loop.stop)

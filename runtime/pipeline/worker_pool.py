"""The pipelined runtime of one Engine: its workers (a transport), the coordinator that
drives them, and the event loop they run on. Modes `pipeline` and `async` share it, so
the replicas (Ray actors holding a core or a GPU each) are created once per engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from dataclasses import asdict, replace

from configs.schema import PseudoStateModeConfig, SamplingConfig
from runtime.decoding.steps import Step
from runtime.pipeline.cluster import ensure_ray
from runtime.pipeline.coordinator import Coordinator
from runtime.pipeline.launch_trees import LaunchSizer
from runtime.pipeline.local_transport import LocalTransport
from runtime.pipeline.transport import Transport
from workers.decode_worker import load_worker
from workers.drafters.loading import load, load_prior, weights_file
from workers.model_registry import REGISTRY
from workers.tree_sizing import TreeSizer, pseudo_row_cost

CANCEL_POLL_S = 0.05  # how often a caller waiting for the workers looks at engine.cancelled


class Cancelled(Exception):
    """engine.cancelled was set while the caller waited for the workers."""


def pseudo_settings(engine) -> PseudoStateModeConfig | None:
    """The verifiers' [ht] settings; None where no hidden-transfer weights exist for the
    checkpoint (none are named and none ship for it): they verify without pseudo states."""
    ht = engine.drafters.ht
    return None if ht.weights == "default" and engine.config.checkpoint != "default" else ht


def drafts_with_model(engine) -> bool:
    """Whether worker 0 holds the [draft] model ([pipeline] drafter; "auto": where one is
    paired with the checkpoint, workers.model_registry)."""
    setting = engine.pipeline.drafter
    if setting == "auto":
        entry = REGISTRY.get(engine.config.checkpoint)
        return entry is not None and entry.draft is not None
    return setting == "draft"


def build_transport(engine) -> Transport:
    """The engine's [pipeline] transport: threads sharing the engine's replicas, or Ray
    actors. Worker 0 may hold the [draft] model, no target (drafts_with_model)."""
    c, ht = engine.pipeline, pseudo_settings(engine)
    draft = engine.draft_model() if drafts_with_model(engine) else None
    vocabulary = engine.draft_vocabulary() if draft is not None else None
    if c.transport == "local":
        def make(i: int):
            if i == 0 and draft is not None:
                return load_worker(engine.config, None, model=draft[1], draft_vocabulary=vocabulary)
            return load_worker(engine.config, ht, model=engine.model)

        return LocalTransport(c.workers, make)
    from runtime.pipeline.ray_transport import RayTransport  # imports ray

    ensure_ray(c.workers)
    specs = [(asdict(engine.config), None if ht is None else asdict(ht), None) for _ in range(c.workers)]
    if draft is not None:
        specs[0] = (asdict(replace(engine.config, checkpoint=draft[0])), None, vocabulary)
    return RayTransport(specs, c.threads)


def launch_sizer(engine) -> LaunchSizer | None:
    """Sizing for the launch trees ([tree_sizing] cost off: None): the engine's device
    curve at the workers' thread count, the pseudo rows of the workers' ht drafter."""
    curve = engine.cost_curve(engine.pipeline.threads)
    if curve is None:
        return None
    ht = pseudo_settings(engine)
    if ht is None:
        return LaunchSizer(TreeSizer(curve), 0.0, 0, 0)
    drafter = load(weights_file(engine.config.checkpoint, "ht", ht.weights), engine.model.args).config
    depth = min(ht.depth or drafter.k, drafter.k)
    return LaunchSizer(TreeSizer(curve), pseudo_row_cost(engine.model.args, drafter.layer), depth, ht.pseudo_nodes)


class WorkerPool:
    def __init__(self, engine):
        self.engine = engine
        # What can fail comes first: a pool that was never made leaves no loop thread behind.
        self.transport = build_transport(engine)
        ht = engine.drafters.ht
        prior = load_prior(engine.config.checkpoint, "ht", ht.prior, engine.model.args.vocab_size)
        self.coordinator = Coordinator(self.transport, engine.pipeline, engine.drafters, engine.model.args.vocab_size,
                                       launch_sizer(engine), prior, pseudo_states=pseudo_settings(engine) is not None,
                                       draft_model=drafts_with_model(engine))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="leapfrog-coordinator", daemon=True).start()

    def start(self) -> None:
        """Create the workers now (replicas load), so the first reply does not wait for them;
        Cancelled when engine.cancelled is set meanwhile."""
        self._call(self.coordinator.start_workers(), cancellable=True)

    def _call(self, coroutine, cancellable: bool = False):
        """Run `coroutine` on the coordinator's loop and wait for it. A cancellable wait
        (a reply's steps, a placement that may take minutes) ends with Cancelled as soon as
        engine.cancelled is set, from any thread; the coroutine is cancelled too."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        while True:
            try:
                return future.result(CANCEL_POLL_S if cancellable else None)
            except concurrent.futures.TimeoutError:
                if self.engine.cancelled.is_set():
                    future.cancel()
                    raise Cancelled("cancelled while waiting for the workers") from None

    def generate(
        self, mode: str, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None
    ) -> Iterator[Step]:
        """The coordinator's async reply as a plain iterator (for Engine.steps); it ends
        early when engine.cancelled is set, even while the workers are still being placed."""
        replies = self.coordinator.generate(prompt_ids, max_new_tokens, self.engine.stop_ids, sampling, mode)

        async def step():
            return await anext(replies, None)

        async def close():
            while replies.ag_running:  # a cancelled step is still draining the reply
                await asyncio.sleep(CANCEL_POLL_S)
            await replies.aclose()  # drains within the coordinator's timeouts

        try:
            while (item := self._call(step(), cancellable=True)) is not None:
                yield item
        except Cancelled:
            return
        finally:
            self._call(close())

    def close(self) -> None:
        self._call(self.coordinator.close())
        self.loop.call_soon_threadsafe(self.loop.stop)

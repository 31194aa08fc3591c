"""The pipelined runtime's coordinator (runtime.pipeline.coordinator; modes pipeline and
async) against in-process workers: every policy, hits and misses of predictions, stale
steps, faults; all identical to `ar`."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import replace

import pytest

from configs.schema import ConfigError, DrafterConfigs, ModelConfig, PipelineConfig, SamplingConfig, TreeSizingConfig
from runtime.engine import Engine
from runtime.pipeline.coordinator import RESTART_ATTEMPTS, Coordinator
from runtime.pipeline.local_transport import LocalTransport
from runtime.pipeline.transport import WorkerFailed
from runtime.pipeline.worker_pool import launch_sizer
from workers.decode_worker import DecodeWorker, load_worker

PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, apple, banana, cherry.",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
]
LOCAL = PipelineConfig(transport="local", workers=2, step_timeout=30.0)


@pytest.fixture(scope="module")
def engine():
    e = Engine(ModelConfig(dtype="float32", device="cpu", max_context=1024), DrafterConfigs(), LOCAL)
    yield e
    e.close()


def ar_tokens(engine, ids, n, sampling=None):
    return [t for s in engine.steps(ids, "ar", n, sampling) for t in s.tokens]


def run(engine, coordinator, ids, n, sampling=None, mode="pipeline"):
    async def collect():
        steps = [s async for s in coordinator.generate(ids, n, engine.stop_ids, sampling, mode)]
        return [t for s in steps for t in s.tokens]

    return asyncio.run(collect())


def make_coordinator(engine, mode="pipeline", worker_class=DecodeWorker, transport_class=LocalTransport, sizing=None,
                     **settings):
    config = replace(LOCAL, **settings)

    def make(i):
        w = load_worker(engine.config, engine.drafters.ht, model=engine.model)
        return worker_class(w.model, w.drafter, w.cache)

    transport = transport_class(config.workers, make)
    coordinator = Coordinator(transport, config, engine.drafters, engine.model.args.vocab_size, sizing)
    coordinator.check_mode(mode)
    return coordinator, transport


# --------------------------------------------------------------------------- identical output


@pytest.mark.parametrize(
    "settings",
    [dict(policy="chain"), dict(policy="fanout", workers=3), dict(predict_layer=20), dict(workers=1)],
    ids=["chain-drafts", "fanout-3-workers", "chain-early-exit-20", "one-worker"],
)
def test_pipeline_identical_to_ar(engine, settings):
    coordinator, _ = make_coordinator(engine, **settings)
    spawned = hits = wasted = 0
    for prompt in PROMPTS:
        ids = engine.encode_chat(prompt)
        assert run(engine, coordinator, ids, 40) == ar_tokens(engine, ids, 40)
        m = coordinator.last_metrics
        spawned, hits, wasted = spawned + m.spawned, hits + m.hits, wasted + m.wasted_steps
    if coordinator.verifiers[1:]:  # several verifiers: predictions were made, held and failed
        assert spawned > 0 and 0 < hits < spawned and wasted > 0
    else:
        assert spawned == 0


@pytest.mark.parametrize("curve", ["flat", "steep", "cpu"])
def test_sized_launch_trees_identical_to_ar(engine, tmp_path, curve):
    """Launch trees cut on the workers' step cost (runtime.pipeline.worker_pool.launch_sizer):
    free rows keep nodes off the trunk and draft at full depth; rows that each double the
    step keep only the predicted trunks; the tokens are ar's on every curve, greedy and sampled."""
    ms = {"flat": lambda n: 10.0, "steep": lambda n: 10.0 * 2 ** min(n - 1, 30), "cpu": lambda n: 10 + 1.5 * (n - 1)}[curve]
    profile = tmp_path / f"{curve}.json"
    profile.write_text(json.dumps({"ms_median": {"128": {str(n): ms(n) for n in range(1, 65)}}}))
    engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost=str(profile)))
    try:
        sizing, plans = launch_sizer(engine), []
        size = sizing.size
        sizing.size = lambda plan, context: plans.append(size(plan, context)) or plans[-1]
        coordinator, _ = make_coordinator(engine, sizing=sizing)
        for prompt, sampling in zip(PROMPTS, [None, SamplingConfig(0.8, 0, 0.95, seed=4), None]):
            ids = engine.encode_chat(prompt)
            assert run(engine, coordinator, ids, 40, sampling) == ar_tokens(engine, ids, 40, sampling)
    finally:
        engine.set_drafter_config("tree_sizing", DrafterConfigs().tree_sizing)
    off_trunk = [len(p.tree) - 1 - p.tree.depths[p.trunk_end] for p in plans]  # nodes beside the trunk
    if curve == "steep":
        assert max(off_trunk) == 0
    else:
        assert max(off_trunk) > 0 and any(p.trunk_end for p in plans)  # predictions were launched on
    if curve == "flat":
        assert sizing.depth == sizing.max_depth


def test_async_mode_identical_to_ar_and_uses_the_chain(engine):
    coordinator, _ = make_coordinator(engine, "async", drafter_layer=24, draft_chunk=2)
    for prompt in PROMPTS:
        ids = engine.encode_chat(prompt)
        assert run(engine, coordinator, ids, 40, mode="async") == ar_tokens(engine, ids, 40)
        assert coordinator.last_metrics.worker_s > 0
    with pytest.raises(ValueError, match="at least 2 workers"):
        make_coordinator(engine, "async", workers=1)


def test_sampled_pipeline_draws_ar_tokens(engine):
    coordinator, _ = make_coordinator(engine, policy="fanout")
    sampling = SamplingConfig(0.8, 0, 0.95, seed=4)
    for prompt in PROMPTS[:2]:
        ids = engine.encode_chat(prompt)
        assert run(engine, coordinator, ids, 32, sampling) == ar_tokens(engine, ids, 32, sampling)


def test_bad_sampling_values_are_refused_before_any_worker_sees_them(engine):
    """A top_k past 64 bits fits no worker message: over Ray every step failed to encode and
    counted as a worker fault. Fields set after a SamplingConfig was made are checked too."""
    coordinator, transport = make_coordinator(engine)
    sampling = SamplingConfig(0.8, 0, 0.95, seed=4)
    sampling.top_k = 2**64
    ids = engine.encode_chat(PROMPTS[2])
    with pytest.raises(ConfigError, match="top_k"):
        run(engine, coordinator, ids, 8, sampling)
    with pytest.raises(ConfigError, match="top_k"):
        engine.steps(ids, "ar", 8, sampling)
    assert transport.handles == {} and coordinator.last_metrics is None
    assert run(engine, coordinator, ids, 8) == ar_tokens(engine, ids, 8)  # nothing was left locked


def test_max_new_tokens_and_the_mode_interface(engine):
    ids = engine.encode_chat(PROMPTS[0])
    for n in (1, 2, 5):
        assert [t for s in engine.steps(ids, "pipeline", n) for t in s.tokens] == ar_tokens(engine, ids, n)
    assert engine.mode("pipeline").metrics["tokens"] == 5
    # Both pipelined modes run on the engine's one set of workers, one after the other.
    pool = engine.workers()
    assert [t for s in engine.steps(ids, "async", 5) for t in s.tokens] == ar_tokens(engine, ids, 5)
    assert engine.workers() is pool and engine.mode("async").metrics["tokens"] == 5


def test_wrong_predictions_are_rolled_back(engine, monkeypatch):
    """Every prediction is garbage: each spawned step goes stale and is aborted; the output
    is still ar's."""
    import runtime.pipeline.coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module, "predict_from_drafts", lambda *a, **k: ([5, 6, 7], [8]))
    coordinator, _ = make_coordinator(engine)
    ids = engine.encode_chat(PROMPTS[1])
    assert run(engine, coordinator, ids, 40) == ar_tokens(engine, ids, 40)
    m = coordinator.last_metrics
    # Every spawned step's trunk is wrong, so it goes stale, or (when it beats the step it
    # extends: it verifies that step's tree too) commits in its place and that one is
    # wasted; which of the two finishes first depends on how the threads are scheduled.
    assert m.spawned > 0 and m.wasted_steps >= m.spawned


# --------------------------------------------------------------------------- mode switches


def test_a_pipeline_reply_after_an_async_one_is_ar(engine):
    """Async's drafter fills worker 0's cache in its first layers only; a pipeline step on
    that worker must not take those positions for verified ones (issue 16)."""
    engine.close()  # a fresh worker set: async is the first mode its workers run
    prompts = [engine.encode_chat(p) for p in PROMPTS[1:]]
    expected = [ar_tokens(engine, ids, 10) for ids in prompts]
    for mode, i in [("async", 0), ("pipeline", 0), ("pipeline", 1)]:
        assert [t for s in engine.steps(prompts[i], mode, 10) for t in s.tokens] == expected[i], (mode, i)


ORDERED_MODES = ("ar", "ht", "ht-pld", "pipeline", "async")  # on one engine and one worker set
SAMPLED = SamplingConfig(0.8, 0, 0.95, seed=7)


def every_ordered_pair(items):
    """A walk through `items` in which every ordered pair (a, b), a == b too, follows each
    other once: an Euler circuit of the complete graph with loops (Hierholzer)."""
    unused = {a: list(items) for a in items}
    walk, stack = [], [items[0]]
    while stack:
        if unused[stack[-1]]:
            stack.append(unused[stack[-1]].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1]


@pytest.mark.parametrize("sampling, phase", [(None, 0), (SAMPLED, 1)], ids=["greedy", "sampled"])
def test_every_order_of_modes_gives_ar_tokens(engine, sampling, phase):
    """Every ordered pair of modes follows each other on one worker set; the prompt changes
    every second reply, so a pair shares its prompt in one phase and not in the other."""
    walk = every_ordered_pair(ORDERED_MODES)
    assert set(zip(walk, walk[1:])) == {(a, b) for a in ORDERED_MODES for b in ORDERED_MODES}
    engine.close()  # a fresh worker set: whatever ran before this test leaves nothing in it
    ids = [engine.encode_chat(p) for p in PROMPTS]
    expected = [ar_tokens(engine, x, 8, sampling) for x in ids]
    for k, mode in enumerate(walk):
        i = (k + phase) // 2 % len(ids)
        got = [t for s in engine.steps(ids[i], mode, 8, sampling) for t in s.tokens]
        assert got == expected[i], f"{mode} after {walk[:k][-1:]} on prompt {i}"


def test_interleaved_modes_prompts_and_cancels_give_ar_tokens(engine):
    """Random modes, prompts and sampling, some replies abandoned after a few steps (the
    caller stops reading): every finished reply is ar's, every abandoned one a prefix of it."""
    rng = random.Random(16)
    engine.close()
    ids = [engine.encode_chat(p) for p in PROMPTS]
    settings = [None, SAMPLED, SamplingConfig(1.0, 20, 1.0, seed=3)]
    expected = {(i, j): ar_tokens(engine, ids[i], 12, settings[j]) for i in range(len(ids)) for j in range(len(settings))}
    cancelled = 0
    for _ in range(16):
        mode, i, j = rng.choice(ORDERED_MODES), rng.randrange(len(ids)), rng.randrange(len(settings))
        stop_after = rng.choice([None, None, 1, 2])
        steps, got = engine.steps(ids[i], mode, 12, settings[j]), []
        for n, step in enumerate(steps, 1):
            got += step.tokens
            if n == stop_after:
                steps.close()
                cancelled += 1
                break
        want = expected[i, j]
        assert got == (want[: len(got)] if n == stop_after else want), (mode, i, j, stop_after)
    assert cancelled > 0


# --------------------------------------------------------------------------- faults


class FailingWorker(DecodeWorker):
    """Raises on its 4th step, or (hang=True) sleeps past the coordinator's timeout."""

    hang = False
    failures = 0

    def step(self, req):
        FailingWorker.failures += 1
        if FailingWorker.failures == 4:
            if self.hang:
                time.sleep(3)
            else:
                raise RuntimeError("injected worker failure")
        return super().step(req)


class HangingWorker(FailingWorker):
    hang = True


@pytest.mark.parametrize("worker_class", [FailingWorker, HangingWorker], ids=["raises", "hangs"])
def test_a_failed_worker_is_restarted_and_nothing_is_lost(engine, worker_class):
    FailingWorker.failures = 0
    coordinator, transport = make_coordinator(engine, worker_class=worker_class, step_timeout=1.0)
    ids = engine.encode_chat(PROMPTS[1])
    assert run(engine, coordinator, ids, 40) == ar_tokens(engine, ids, 40)
    assert coordinator.last_metrics.faults >= 1 and transport.restarts >= 1
    assert run(engine, coordinator, ids, 20) == ar_tokens(engine, ids, 20)  # the restarted worker serves again


class DrafterFailingOnce(DecodeWorker):
    """Raises on the 3rd draft call of the run (whichever worker makes it)."""

    drafts = 0

    def draft(self, req):
        DrafterFailingOnce.drafts += 1
        if DrafterFailingOnce.drafts == 3:
            raise RuntimeError("injected drafter failure")
        return super().draft(req)


def test_a_restarted_drafter_drafts_from_its_new_cache(engine):
    """The restarted drafter's cache is empty: its next draft must not keep the positions
    the dead one held (that faulted again, on every draft, until it sat out)."""
    DrafterFailingOnce.drafts = 0
    coordinator, transport = make_coordinator(engine, "async", worker_class=DrafterFailingOnce, draft_chunk=1)
    ids = engine.encode_chat(PROMPTS[0])
    assert run(engine, coordinator, ids, 40, mode="async") == ar_tokens(engine, ids, 40)
    m = coordinator.last_metrics
    assert m.faults == 1 and transport.restarts == 1 and DrafterFailingOnce.drafts > 4  # it drafted again after


class Unrestartable(LocalTransport):
    """No replacement replica can be made (a device gone, a cluster full)."""

    async def restart(self, i):
        self.restarts += 1
        raise RuntimeError("no replica can be made")


def test_a_worker_out_of_restarts_leaves_the_request_to_the_others(engine):
    FailingWorker.failures = 0
    coordinator, transport = make_coordinator(engine, worker_class=FailingWorker, transport_class=Unrestartable)
    ids = engine.encode_chat(PROMPTS[1])
    assert run(engine, coordinator, ids, 40) == ar_tokens(engine, ids, 40)
    assert coordinator.last_metrics.faults == 1 and transport.restarts == RESTART_ATTEMPTS
    assert len(coordinator.down) == 1  # it sits out; the next request tries it again


def test_async_without_verifiers_left_verifies_on_the_drafter(engine):
    """The one verifier fails for good: the drafter verifies the rest (its cache was filled
    by early-exit drafts, so it catches up from what is complete in every layer)."""
    FailingWorker.failures = 0
    coordinator, transport = make_coordinator(engine, "async", worker_class=FailingWorker, transport_class=Unrestartable)
    ids = engine.encode_chat(PROMPTS[1])
    assert run(engine, coordinator, ids, 40, mode="async") == ar_tokens(engine, ids, 40)
    assert coordinator.last_metrics.faults == 1 and coordinator.down == {1} and coordinator.verifiers == [0]


async def forever(*args):
    await asyncio.Event().wait()


class FrozenAborts(LocalTransport):
    """Its workers step, but never answer an abort (a frozen actor's control calls)."""

    async def handle(self, i):
        handle = await super().handle(i)
        handle.abort = forever
        return handle


class FrozenLoad(LocalTransport):
    """Worker 1's replica never finishes loading."""

    async def handle(self, i):
        if i == 1 and i not in self.handles:
            await forever()
        return await super().handle(i)


def test_a_cancelled_reply_does_not_wait_for_frozen_aborts(engine):
    coordinator, _ = make_coordinator(engine, transport_class=FrozenAborts, step_timeout=1.0)
    ids = engine.encode_chat(PROMPTS[1])

    async def cancel_after_the_first_step():
        replies = coordinator.generate(ids, 40, engine.stop_ids)
        await anext(replies)
        assert coordinator.current.launches  # steps in flight: the drain aborts them
        await replies.aclose()

    asyncio.run(asyncio.wait_for(cancel_after_the_first_step(), 20))
    assert run(engine, coordinator, ids, 8) == ar_tokens(engine, ids, 8)


def test_a_replica_that_never_loads_fails_the_start_in_time(engine):
    coordinator, _ = make_coordinator(engine, transport_class=FrozenLoad, start_timeout=1.0)
    with pytest.raises(WorkerFailed, match="did not start"):
        asyncio.run(asyncio.wait_for(coordinator.start_workers(), 20))


@pytest.mark.parametrize("transport_class", [LocalTransport, Unrestartable], ids=["restarts", "no-restarts"])
def test_no_hang_when_every_worker_fails(engine, transport_class):
    class Broken(DecodeWorker):
        def step(self, req):
            raise RuntimeError("broken")

    coordinator, _ = make_coordinator(engine, worker_class=Broken, transport_class=transport_class)
    with pytest.raises(WorkerFailed, match="worker 1: .*(broken|no replica)"):
        run(engine, coordinator, engine.encode_chat(PROMPTS[2]), 10)

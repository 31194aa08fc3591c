"""The pipelined runtime end to end on a local Ray cluster: two actor workers (one CPU core
each) give `ar`'s tokens; killing an actor mid-request loses and changes nothing."""

from __future__ import annotations

import os
import time

import pytest

from configs.schema import DrafterConfigs, ModelConfig, PipelineConfig
from runtime.engine import Engine

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
PROMPT = "Write a Python function that reverses a string."


@pytest.fixture(scope="module")
def engine():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    e = Engine(
        ModelConfig(dtype="float32", device="cpu", max_context=1024),
        DrafterConfigs(),
        PipelineConfig(transport="ray", workers=2, step_timeout=60.0),
    )
    yield e
    e.close()
    ray.shutdown()


def ar_tokens(engine, ids, n):
    return [t for s in engine.steps(ids, "ar", n) for t in s.tokens]


def test_ray_pipeline_identical_to_ar(engine):
    ids = engine.encode_chat(PROMPT)
    assert [t for s in engine.steps(ids, "pipeline", 48) for t in s.tokens] == ar_tokens(engine, ids, 48)
    metrics = engine.mode("pipeline").metrics
    assert metrics["tokens"] == 48 and metrics["steps"] > 0 and metrics["faults"] == 0
    assert metrics["worker_s"] > 0 and metrics["spawned"] > 0  # both actors worked, on predictions


def test_ray_async_shares_the_workers(engine):
    transport = engine.workers().transport
    ids = engine.encode_chat(PROMPT)
    assert [t for s in engine.steps(ids, "async", 32) for t in s.tokens] == ar_tokens(engine, ids, 32)
    assert engine.workers().transport is transport and len(transport.handles) == 2
    assert engine.mode("async").metrics["faults"] == 0


def test_killing_an_actor_mid_request_loses_nothing(engine):
    import ray

    mode, transport = engine.mode("pipeline"), engine.workers().transport
    ids = engine.encode_chat(PROMPT)
    tokens: list[int] = []
    for i, step in enumerate(engine.steps(ids, "pipeline", 48)):
        tokens += step.tokens
        if i == 2:
            victim = transport.handles[1].actor
            ray.kill(victim, no_restart=True)
    assert tokens == ar_tokens(engine, ids, 48)
    assert mode.metrics["faults"] >= 1 and transport.restarts >= 1
    # The replacement loads in the background (the request did not wait for it) ...
    deadline = time.monotonic() + 120
    while 1 not in transport.handles and time.monotonic() < deadline:
        time.sleep(0.5)
    assert transport.handles[1].actor != victim
    # ... and serves the next request next to worker 0 (steps spawned on predictions), exactly.
    ids = engine.encode_chat("What is the capital of France?")
    assert [t for s in engine.steps(ids, "pipeline", 32) for t in s.tokens] == ar_tokens(engine, ids, 32)
    assert mode.metrics["faults"] == 0 and mode.metrics["spawned"] > 0


def test_a_draft_model_actor_drafts_for_target_actors(engine, tiny_checkpoint, tiny_models):
    """[pipeline] drafter = "draft" over Ray: worker 0's actor loads the draft model's
    checkpoint and no pseudo-state drafter, worker 1's the target's; `ar`'s tokens."""
    import asyncio
    from dataclasses import asdict

    from runtime.decoding.autoregressive import generate_ar
    from runtime.pipeline.coordinator import Coordinator
    from runtime.pipeline.ray_transport import RayTransport
    from workers.sampling import chooser
    from workers.tree_step import decoding_cache

    engine.close()  # its actors' cores go back to the cluster (a later reply of it starts new ones)
    target = tiny_models("qwen2")[0]
    config = PipelineConfig(transport="ray", workers=2, step_timeout=60.0, drafter="draft", draft_chunk=1)
    model = ModelConfig(dtype="float32", device="cpu", max_context=256)
    specs = [(asdict(ModelConfig(**{**asdict(model), "checkpoint": str(tiny_checkpoint(kind))})), None, None)
             for kind in ("qwen2_draft", "qwen2")]
    coordinator = Coordinator(RayTransport(specs), config, DrafterConfigs(), target.args.vocab_size, pseudo_states=False,
                              draft_model=True)
    ids = [5, 9, 2, 7, 11]

    async def collect():
        try:
            return [t for s in [s async for s in coordinator.generate(ids, 24, set(), None, "async")] for t in s.tokens]
        finally:
            await coordinator.close()

    expected = [t for s in generate_ar(target, decoding_cache(target, 256), ids, 24, set(), chooser(None, 24)) for t in s.tokens]
    assert asyncio.run(collect()) == expected
    assert coordinator.last_metrics.drafts > 0 and coordinator.last_metrics.faults == 0

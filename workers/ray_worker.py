"""The decoding worker as a Ray actor, and how a worker is built from the configs.

The actor speaks msgpack bytes (runtime.messages) in both directions. `step` is a Ray
streaming generator: it yields the encoded Prediction (b"" when none was asked for) as
soon as the worker has it, then the encoded StepResult. `abort` and `health` run in their
own concurrency group, so they reach a worker that is busy with a step.
"""

from __future__ import annotations

import os

import ray
import torch

from runtime.config import HtConfig, ModelConfig
from runtime.messages import StepResult, decode, encode
from workers.decode_worker import DecodeWorker, advance


def load_worker(model_config: ModelConfig, ht: HtConfig, model=None) -> DecodeWorker:
    """A worker with its own KV cache; `model` shares an already loaded replica (in-process)."""
    from runtime.engine import TREE_HEADROOM
    from workers.drafters.pseudo_states import load, shipped_weights
    from workers.loading import load_model

    if model is None:
        model, _ = load_model(model_config.checkpoint, model_config.torch_dtype(), model_config.torch_device())
    path = shipped_weights(model_config.checkpoint, "ht") if ht.weights == "default" else ht.weights
    drafter = load(path, model.args)
    if ht.depth:
        drafter = drafter.first(min(ht.depth, drafter.config.k))
    return DecodeWorker(model, drafter.to(model.device), model.new_cache(model_config.max_context + TREE_HEADROOM))


@ray.remote(concurrency_groups={"control": 1})
class RayDecodeWorker:
    def __init__(self, model_config: dict, ht: dict, threads: int):
        torch.set_num_threads(threads)
        self.worker = load_worker(ModelConfig(**model_config), HtConfig(**ht))

    def step(self, request: bytes):
        steps = self.worker.step(decode(request))
        first = advance(steps)
        yield b"" if first is None else encode(first)
        if not isinstance(first, StepResult):
            yield encode(advance(steps))

    def draft(self, request: bytes) -> bytes:
        return encode(self.worker.draft(decode(request)))

    @ray.method(concurrency_group="control")
    def abort(self, step_id: int) -> None:
        self.worker.abort(step_id)

    @ray.method(concurrency_group="control")
    def health(self) -> dict:
        return {**self.worker.health(), "pid": os.getpid()}

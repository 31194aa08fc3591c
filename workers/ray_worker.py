"""The decoding worker (workers.decode_worker) as a Ray actor.

The actor speaks msgpack bytes (workers.messages) in both directions. `step` is a Ray
streaming generator: it yields the encoded Prediction (b"" when none was asked for) as
soon as the worker has it, then the encoded StepResult. `abort` and `health` run in their
own concurrency group, so they reach a worker that is busy with a step.
"""

from __future__ import annotations

import os

import ray
import torch

from configs.schema import ModelConfig, PseudoStateModeConfig
from workers.decode_worker import advance, load_worker
from workers.messages import StepResult, decode, encode


@ray.remote(concurrency_groups={"control": 1})
class RayDecodeWorker:
    def __init__(self, model_config: dict, ht: dict | None, draft_vocabulary: list[int] | None, threads: int):
        torch.set_num_threads(threads)
        self.worker = load_worker(ModelConfig(**model_config), None if ht is None else PseudoStateModeConfig(**ht),
                                  draft_vocabulary=draft_vocabulary)

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

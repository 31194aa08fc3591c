"""The engine: one model, its tokenizer and KV cache, and the decoding modes over them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from runtime.chat import encode_chat, stop_ids
from runtime.config import DrafterConfigs, ModelConfig, PipelineConfig, SamplingConfig
from runtime.decoding import Step
from workers.loading import load_model, load_tokenizer


class PromptTooLongError(ValueError):
    pass


# Cache slots beyond max_context for the pending positions of a tree step
# (tree nodes plus pseudo states), which are written before acceptance trims them.
TREE_HEADROOM = 512


class Engine:
    def __init__(self, config: ModelConfig, drafters: DrafterConfigs | None = None, pipeline: PipelineConfig | None = None):
        self.config = config
        self.drafters = drafters or DrafterConfigs()
        self.pipeline = pipeline or PipelineConfig()
        self.model, self.folder = load_model(config.checkpoint, config.torch_dtype(), config.torch_device())
        self.tokenizer = load_tokenizer(self.folder)
        self.cache = self.model.new_cache(config.max_context + TREE_HEADROOM)
        self.stop_ids = stop_ids(self.tokenizer, self.folder)
        self._modes: dict[str, object] = {}
        self._workers = None  # runtime.worker_pool.WorkerPool of the pipelined modes, made on first use

    def encode_chat(self, prompt: str | list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, prompt)

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.config.max_context:
            raise PromptTooLongError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the context of {self.config.max_context} positions"
            )

    def mode(self, name: str):
        """The decoding mode called `name`, built on first use."""
        from runtime.modes import build_mode

        if name not in self._modes:
            self._modes[name] = build_mode(name, self)
        return self._modes[name]

    def workers(self):
        """The pipelined modes' workers and coordinator, started on first use."""
        from runtime.worker_pool import WorkerPool

        if self._workers is None:
            self._workers = WorkerPool(self)
        return self._workers

    def set_drafter_config(self, name: str, settings) -> None:
        """Replace one field of DrafterConfigs ("ht", "medusa", "pass_", ...); the modes
        that draft are rebuilt on their next use (the hf peers are kept), the workers restart."""
        self.drafters = dataclasses.replace(self.drafters, **{name: settings})
        self._modes = {name: mode for name, mode in self._modes.items() if name == "ar" or name.startswith("hf")}
        self.close()

    def set_pipeline_config(self, pipeline: PipelineConfig) -> None:
        """New [pipeline] settings; the workers restart on next use."""
        self.pipeline = pipeline.validate()
        self.close()

    def close(self) -> None:
        """Stop the pipelined modes' workers (a later pipelined reply starts new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def steps(
        self, prompt_ids: list[int], mode: str, max_new_tokens: int, sampling: SamplingConfig | None = None
    ) -> Iterator[Step]:
        """The reply as Steps; greedy unless `sampling` has a temperature above 0."""
        self.check_fits(prompt_ids, max_new_tokens)
        if sampling is not None:
            sampling.validate()
        return self.mode(mode).generate(prompt_ids, max_new_tokens, sampling)

"""The engine: one model, its tokenizer and KV cache, and the decoding modes over them.

`Engine.from_config(config)` is the one way the CLI, the sweep and the Ray job build one.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

from configs.schema import ConfigError, DrafterConfigs, LeapfrogConfig, ModelConfig, PipelineConfig, SamplingConfig
from runtime.decoding.steps import Step
from runtime.modes import build_mode
from runtime.pipeline.worker_pool import WorkerPool
from runtime.text.chat import encode_chat, stop_ids
from runtime.training.token_counts import most_frequent, reply_token_counts
from runtime.batching.step_batcher import StepBatcher
from workers.cost_curve import device_profile
from workers.drafters.draft_model import draft_checkpoint, load_draft_model
from workers.loading import load_model, load_tokenizer
from workers.tree_sizing import CostCurve, TreeSizer
from workers.tree_step import decoding_cache


class PromptTooLongError(ValueError):
    pass


class Engine:
    def __init__(self, config: ModelConfig, drafters: DrafterConfigs | None = None, pipeline: PipelineConfig | None = None,
                 model_of: Engine | None = None):
        """Loads the model, or with `model_of` shares that engine's (its weights and measured
        cost curves: see `sibling`)."""
        self.config = config
        self.drafters = drafters or DrafterConfigs()
        self.pipeline = pipeline or PipelineConfig()
        if model_of is None:
            self.model, self.folder = load_model(
                config.checkpoint, config.torch_dtype(), config.torch_device(), config.kernels, config.cuda_graphs,
                weights=config.weights,
            )
        else:
            self.model, self.folder = model_of.model, model_of.folder
        self.tokenizer = load_tokenizer(self.folder)  # its own: a fast tokenizer is not safe across threads
        self.cache = decoding_cache(self.model, config.max_context)
        self.stop_ids = stop_ids(self.tokenizer, self.folder)
        self._modes: dict[str, object] = {}
        self._workers = None  # runtime.pipeline.worker_pool.WorkerPool of the pipelined modes, made on first use
        # Other models loaded beside this one by checkpoint name (the [draft] model), shared by siblings
        self.models_beside: dict[str, object] = {} if model_of is None else model_of.models_beside
        # [tree_sizing] cost by torch threads, read on first use; one device, so siblings share them
        self._cost_curves: dict[int, CostCurve] = {} if model_of is None else model_of._cost_curves
        # [draft] vocab -> its token ids, read on first use (one tokenizer, so siblings share them)
        self._draft_vocabularies: dict[int, list[int]] = {} if model_of is None else model_of._draft_vocabularies
        # The steps of this engine's and its siblings' replies decoding at once run in one pass;
        # the lane is this engine's seat there (runtime.batching.step_batcher)
        self.batcher = StepBatcher(self.model) if model_of is None else model_of.batcher
        self.lane = self.batcher.lane()
        self.lane.plain_when_shared = self.plain_when_shared()
        # Set from any thread: a pipelined reply ends at once, even while its workers are
        # still being placed (other modes stop with the caller between steps). The server
        # puts each request's own flag here while it decodes.
        self.cancelled = threading.Event()

    @classmethod
    def from_config(cls, config: LeapfrogConfig) -> Engine:
        """An engine with every section of `config` that decoding reads; sets torch's CPU threads."""
        import torch

        torch.set_num_threads(config.runtime.threads)
        return cls(config.model, config.drafters, config.pipeline)

    def sibling(self) -> Engine:
        """Another engine on this engine's model: the same weights in memory, its own KV cache,
        tokenizer, modes (drafter state) and pipelined workers. A server gives each concurrent
        request one (runtime.serving.servers.engine_pool), so memory grows by a cache per
        request, not by a model. Siblings may decode at once from different threads: a forward
        pass only reads the weights (CUDA graphs take their lock, workers.graphed_layers)."""
        return Engine(self.config, self.drafters, self.pipeline, model_of=self)

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
        """The decoding mode called `name`, built on first use (runtime.modes)."""
        if name not in self._modes:
            self._modes[name] = build_mode(name, self)
        return self._modes[name]

    def cost_curve(self, threads: int | None = None) -> CostCurve | None:
        """This device's step cost t(n) as [tree_sizing] cost says, with `threads` torch
        threads (the pipeline workers' count; None: the engine's); None when "off"."""
        import torch

        setting = self.drafters.tree_sizing.cost
        if setting == "off":
            return None
        threads = threads or torch.get_num_threads()
        if threads not in self._cost_curves:
            if setting == "auto":
                own = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    profile = device_profile(self)
                finally:
                    torch.set_num_threads(own)
            else:
                try:
                    profile = json.loads(Path(setting).read_text())
                except (OSError, ValueError) as e:
                    raise ConfigError(f"[tree_sizing] cost: cannot read the profile {setting}: {e}") from None
            try:
                self._cost_curves[threads] = CostCurve.from_profile(profile)
            except ValueError as e:
                raise ConfigError(f"[tree_sizing] cost {setting}: {e}") from None
        return self._cost_curves[threads]

    def draft_model(self) -> tuple[str, object]:
        """The [draft] model's checkpoint name and model, loaded once for this engine and its
        siblings (mode `draft`'s proposer, `async`'s drafter worker); a ModelLoadError
        naming both checkpoints when its vocabulary is not the target's."""
        name = draft_checkpoint(self.drafters.draft.checkpoint, self.config.checkpoint)
        if name not in self.models_beside:
            self.models_beside[name] = load_draft_model(name, self.model, self.folder, self.config)
        return name, self.models_beside[name]

    def draft_vocabulary(self) -> list[int] | None:
        """The token ids the [draft] model drafts among: the [draft] vocab most frequent ones
        in ShareGPT's training replies (runtime.training.token_counts: counted once, cached);
        None for the whole vocabulary (vocab 0, or no fewer than the model has)."""
        size, vocab = self.drafters.draft.vocab, self.model.args.vocab_size
        if size < 0:
            raise ConfigError(f"[draft] vocab must be >= 0 (0: the whole vocabulary), got {size}")
        if size == 0 or size >= vocab:
            return None
        if size not in self._draft_vocabularies:
            self._draft_vocabularies[size] = most_frequent(reply_token_counts(self.tokenizer, vocab), size).tolist()
        return self._draft_vocabularies[size]

    def tree_sizer(self, drafter_trees: bool = False) -> TreeSizer | None:
        """A new TreeSizer on this device's cost curve (None when sizing is off); for a
        drafter's unscored trees when `drafter_trees`."""
        curve = self.cost_curve()
        if curve is None:
            return None
        return TreeSizer.for_drafter_trees(curve) if drafter_trees else TreeSizer(curve)

    def workers(self):
        """The pipelined modes' workers and coordinator, started on first use."""
        if self._workers is None:
            self._workers = WorkerPool(self)
        return self._workers

    def plain_when_shared(self) -> bool:
        """Whether tree modes step plain while other replies share the passes ([tree_sizing] shared)."""
        setting = self.drafters.tree_sizing.shared
        return setting == "plain" or (setting == "auto" and self.model.device.type == "cpu")

    def set_drafter_config(self, name: str, settings) -> None:
        """Replace one field of DrafterConfigs ("ht", "medusa", "pass_", ...); the modes
        that draft are rebuilt on their next use (the hf peers are kept), the workers restart."""
        self.drafters = dataclasses.replace(self.drafters, **{name: settings})
        self.lane.plain_when_shared = self.plain_when_shared()
        self._cost_curves = {}
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
        """The reply as Steps; greedy unless `sampling` has a temperature above 0. Its
        values are checked again here (fields may have been set after it was made)."""
        self.check_fits(prompt_ids, max_new_tokens)
        if sampling is not None:
            sampling.validate()
        return self.mode(mode).generate(prompt_ids, max_new_tokens, sampling)

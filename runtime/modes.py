"""Decoding modes by name. Each mode turns prompt ids into Steps (runtime.decoding.steps.Step):

    mode.generate(prompt_ids, max_new_tokens, sampling) -> Iterator[Step]

`sampling` (configs.schema.SamplingConfig, None = greedy) picks the tokens; every mode
here but the peers (hf, llama.cpp) draws exactly `ar`'s tokens for the same seed
(workers.sampling).
Modes with trained drafters report `drafter_info` (parameters, training time) for the
benchmark table. A mode is a thin adapter: `ar`, a preset of proposers for the one
speculative loop (PRESETS; runtime.decoding.speculative), a peer, or the engine's workers
(runtime.pipeline).

`check_mode` is the one check of a mode name; the CLI, the server and the sweep call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from configs.schema import SamplingConfig
from runtime.decoding.autoregressive import generate_ar
from runtime.decoding.hf_peers import HfGenerateMode
from runtime.decoding.llama_cpp_peer import LlamaCppMode
from runtime.decoding.speculative import SpeculativeDecoder
from runtime.decoding.steps import Step
from runtime.pipeline.coordinator import MODES as PIPELINED_MODES  # noqa: F401 - the modes on several workers, named here too
from runtime.decoding.proposers import build_proposer
from workers.sampling import chooser


class UnknownModeError(ValueError):
    pass


class AutoregressiveMode:
    """Plain decoding with our engine: the reference every other mode must equal."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        e = self.engine
        steps = generate_ar(e.model, e.cache, prompt_ids, max_new_tokens, e.stop_ids, chooser(sampling, max_new_tokens),
                            e.lane)  # one pass with the steps of its siblings' replies
        return e.lane.decoding(steps)


class SpeculativeMode:
    """The speculative loop (runtime.decoding.speculative) with the proposers of `names`
    (runtime.decoding.proposers), built from the engine's config."""

    def __init__(self, engine, names: tuple[str, ...]):
        self.engine = engine
        built = [build_proposer(name, engine) for name in names]
        proposers = [p for p, _ in built]
        scored = getattr(proposers[0], "scored", False)  # unscored trees: rated by their slots
        self.decoder = SpeculativeDecoder(engine.model, engine.cache, proposers, engine.tree_sizer(drafter_trees=not scored),
                                          engine.lane)
        self.drafter_info = next((info for _, info in built if info), None)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        choose = chooser(sampling, max_new_tokens)
        return self.engine.lane.decoding(self.decoder.generate(prompt_ids, max_new_tokens, self.engine.stop_ids, choose))


class PipelineMode:
    """Several workers (model replicas) on one reply: the engine's WorkerPool
    (runtime.pipeline.worker_pool) with the [pipeline] settings, over Ray actors or
    in-process threads. `metrics` describes the last reply of this mode."""

    name = "pipeline"

    def __init__(self, engine):
        self.engine, self.metrics = engine, None
        pool = self.engine.workers()
        pool.coordinator.check_mode(self.name)
        pool.start()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        pool = self.engine.workers()
        try:
            yield from pool.generate(self.name, prompt_ids, max_new_tokens, sampling)
        finally:
            last = pool.coordinator.last_metrics
            self.metrics = None if last is None else last.summary()


class AsyncDraftMode(PipelineMode):
    """Worker 0 drafts ahead with early-exit layers; the others verify what it drafted."""

    name = "async"


# The speculative modes: each a preset of proposers, the first starting every tree
# (runtime.decoding.proposers has them; `spec` takes the [speculation] list).
PRESETS: dict[str, tuple[str, ...]] = {
    "ht": ("ht", "pld"),  # hidden-transfer trees with the prompt-lookup chain grafted on
    "ht-pld": ("ht", "pld"),  # the same: its name before `ht` had the chain by default
    "ht-alone": ("ht",),
    "medusa": ("medusa",),
    "pass": ("pass",),
    "eagle": ("eagle",),
    "eagle-pld": ("eagle", "pld"),
    "early-exit": ("early-exit",),
    "pld": ("pld",),
    "token-recycling": ("token-recycling",),
    "draft": ("draft",),  # a separate draft model ([draft]: the target's paired one, qwen2.5-coder-0.5b for the 1.5B)
    "draft-pld": ("draft", "pld"),
}


def _preset(names: tuple[str, ...]) -> Callable:
    return lambda engine: SpeculativeMode(engine, names)


def _hf(**kind) -> Callable:
    return lambda engine: HfGenerateMode(engine, **kind)


MODES: dict[str, Callable] = {
    "ar": AutoregressiveMode,
    **{name: _preset(names) for name, names in PRESETS.items()},
    "spec": lambda engine: SpeculativeMode(engine, engine.drafters.speculation.checked()),
    "hf": _hf(),
    "hf-pld": _hf(prompt_lookup=True),
    "hf-draft": _hf(assisted=True),  # transformers' assisted generation with the [draft] checkpoint
    "llama.cpp": lambda engine: LlamaCppMode(engine, "llama.cpp", None),  # optional: `make llama-cpp`
    "llama.cpp-bf16": lambda engine: LlamaCppMode(engine, "llama.cpp-bf16", "bf16"),
    "llama.cpp-f32": lambda engine: LlamaCppMode(engine, "llama.cpp-f32", "f32"),
    "pipeline": PipelineMode,
    "async": AsyncDraftMode,
}


# The modes a server offers besides its own by default ([server] allowed_modes): lossless,
# on the engine's one model; not the peers (a model copy each) nor the pipelined modes
# (Ray workers of their own).
SINGLE_WORKER_LOSSLESS_MODES = ("ar", *PRESETS, "spec")


def check_mode(name: str) -> None:
    """UnknownModeError, naming the modes there are, unless `name` is one of them."""
    if name not in MODES:
        raise UnknownModeError(f"unknown mode {name!r}; available: {', '.join(MODES)}")


def build_mode(name: str, engine):
    check_mode(name)
    return MODES[name](engine)

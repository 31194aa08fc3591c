"""Decoding modes by name. Each mode turns prompt ids into Steps (runtime.decoding.steps.Step):

    mode.generate(prompt_ids, max_new_tokens, sampling) -> Iterator[Step]

`sampling` (configs.schema.SamplingConfig, None = greedy) picks the tokens; every mode
here but the peers (hf, llama.cpp) draws exactly `ar`'s tokens for the same seed
(workers.sampling).
Modes with trained drafters report `drafter_info` (parameters, training time) for the
benchmark table. A mode is a thin adapter: it builds its decoder (runtime.decoding) or
reaches the engine's workers (runtime.pipeline) from the engine's config.

`check_mode` is the one check of a mode name; the CLI, the server and the sweep call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from configs.schema import ConfigError, SamplingConfig
from runtime.decoding.autoregressive import generate_ar
from runtime.decoding.hf_peers import HfGenerateMode
from runtime.decoding.llama_cpp_peer import LlamaCppMode
from runtime.decoding.pseudo_state_decoder import PseudoStateDecoder
from runtime.decoding.steps import Step
from runtime.decoding.tree_decoder import TreeDecoder
from runtime.pipeline.coordinator import MODES as PIPELINED_MODES  # noqa: F401 - the modes on several workers, named here too
from workers.drafters.eagle import EagleDrafter, EagleModel
from workers.drafters.early_exit import EarlyExitDrafter
from workers.drafters.conditional_head import ConditionedHead
from workers.drafters.loading import DrafterWeightsError, load, load_head, load_prior, weights_file
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.drafters.token_recycling import TokenRecyclingDrafter
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


def prompt_lookup_drafter(engine) -> PromptLookupDrafter:
    c = engine.drafters.pld
    return PromptLookupDrafter(c.min_ngram, c.max_ngram, c.depth)


def token_recycling_drafter(engine) -> TokenRecyclingDrafter:
    c = engine.drafters.token_recycling
    return TokenRecyclingDrafter(engine.model.args.vocab_size, c.top_k, c.budget)


class PseudoStateMode:
    """A pseudo-state drafter (workers.drafters.pseudo_states) of `kind`, drafting inside the
    forward pass that verifies its token tree (runtime.decoding.pseudo_state_decoder)."""

    kind = "ht"
    settings_field = "ht"  # the DrafterConfigs field with its weights and tree settings
    retrieval: tuple[bool, bool] | None = None  # (lookup, recycling) of the mode; None: the settings'

    def __init__(self, engine):
        e = engine
        settings = getattr(e.drafters, self.settings_field)
        path = weights_file(e.config.checkpoint, self.kind, settings.weights)
        drafter = load(path, e.model.args)
        if drafter.config.kind != self.kind:
            raise DrafterWeightsError(f"{path} holds a {drafter.config.kind} drafter, not a {self.kind} one")
        self.engine = e
        with_lookup, with_recycling = self.retrieval or (settings.lookup, settings.recycling)
        lookup = prompt_lookup_drafter(e) if with_lookup else None
        recycling = token_recycling_drafter(e) if with_recycling else None
        prior = load_prior(e.config.checkpoint, self.kind, settings.prior, e.model.args.vocab_size)
        head = load_head(e.config.checkpoint, self.kind, settings.head, e.model.args)
        if head is not None and prior is None:
            raise DrafterWeightsError(f"[{self.settings_field}] head needs a successor prior under it: set `prior`")
        conditioned = ConditionedHead(head, e.model.lm_head.weight, prior) if head is not None else None
        self.decoder = PseudoStateDecoder(e.model, drafter.to(e.model.device), e.cache, settings, lookup, e.tree_sizer(),
                                          recycling, prior, e.lane, conditioned)
        trained = drafter.training_summary
        self.drafter_info = {"parameters": drafter.parameter_count(), "training_s": trained.get("time_s"),
                             "training_steps": trained.get("steps")}

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        choose = chooser(sampling, max_new_tokens)
        return self.engine.lane.decoding(self.decoder.generate(prompt_ids, max_new_tokens, self.engine.stop_ids, choose))


class MedusaMode(PseudoStateMode):
    kind = settings_field = "medusa"


class LookaheadMode(PseudoStateMode):
    kind, settings_field = "pass", "pass_"


class HiddenTransferLookupMode(PseudoStateMode):
    """`ht` trees with the prompt-lookup chain of the [pld] settings grafted on, and no recycled successors."""

    retrieval = (True, False)


class HiddenTransferRecyclingMode(PseudoStateMode):
    """`ht-pld` trees with token recycling's successors grafted under every drafted node too."""

    retrieval = (True, True)


class HiddenTransferAloneMode(PseudoStateMode):
    """`ht` trees from the hidden-transfer drafts alone: no retrieval drafts grafted on."""

    retrieval = (False, False)


class TreeDrafterMode:
    """A drafter from workers/drafters proposes a token tree each step; runtime.decoding.tree_decoder
    verifies it. Subclasses build the drafter from the engine's config."""

    with_lookup = False  # graft the [pld] prompt-lookup chain onto every proposal

    def __init__(self, engine):
        self.engine = engine
        lookup = prompt_lookup_drafter(engine) if self.with_lookup else None
        self.decoder = TreeDecoder(engine.model, engine.cache, self.build_drafter(engine), self.tree_sizer(engine), lookup,
                                   engine.lane)

    def tree_sizer(self, engine):
        return engine.tree_sizer(drafter_trees=True)  # unscored trees: rated by slot

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        choose = chooser(sampling, max_new_tokens)
        return self.engine.lane.decoding(self.decoder.generate(prompt_ids, max_new_tokens, self.engine.stop_ids, choose))


class PromptLookupMode(TreeDrafterMode):
    build_drafter = staticmethod(prompt_lookup_drafter)


class TokenRecyclingMode(TreeDrafterMode):
    build_drafter = staticmethod(token_recycling_drafter)


class EarlyExitMode(TreeDrafterMode):
    @staticmethod
    def build_drafter(engine):
        c, n_layers = engine.drafters.early_exit, engine.model.args.n_layers
        if c.layer > n_layers:
            raise ConfigError(f"[early_exit] layer {c.layer} is beyond this model's {n_layers} layers")
        return EarlyExitDrafter(engine.model, engine.cache, c.layer or n_layers // 2, c.depth)


class EagleMode(TreeDrafterMode):
    """The EAGLE-2 peer: its draft model reads the target's features (workers.drafters.eagle)."""

    def __init__(self, engine):
        e = engine
        self.eagle = EagleModel.load(weights_file(e.config.checkpoint, "eagle", e.drafters.eagle.weights), e.model.args)
        super().__init__(engine)
        trained = self.eagle.training_summary
        self.drafter_info = {"parameters": self.eagle.parameter_count(), "training_s": trained.get("time_s"),
                             "training_steps": trained.get("steps")}

    def build_drafter(self, engine):
        c = engine.drafters.eagle
        return EagleDrafter(self.eagle, engine.model, engine.cache.max_len, c.depth, c.top_k, c.budget)

    def tree_sizer(self, engine):
        return engine.tree_sizer()  # its trees are scored by the draft model


class EagleLookupMode(EagleMode):
    """`eagle` trees with the prompt-lookup chain of the [pld] settings grafted on (as `ht` has it)."""

    with_lookup = True


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


def _hf(prompt_lookup: bool) -> Callable:
    return lambda engine: HfGenerateMode(engine, prompt_lookup=prompt_lookup)


MODES: dict[str, Callable] = {
    "ar": AutoregressiveMode,
    "ht": PseudoStateMode,
    "ht-pld": HiddenTransferLookupMode,
    "ht-alone": HiddenTransferAloneMode,
    "ht-recycle": HiddenTransferRecyclingMode,
    "hf": _hf(prompt_lookup=False),
    "hf-pld": _hf(prompt_lookup=True),
    "llama.cpp": lambda engine: LlamaCppMode(engine, "llama.cpp", None),  # optional: `make llama-cpp`
    "llama.cpp-bf16": lambda engine: LlamaCppMode(engine, "llama.cpp-bf16", "bf16"),
    "llama.cpp-f32": lambda engine: LlamaCppMode(engine, "llama.cpp-f32", "f32"),
    "medusa": MedusaMode,
    "pass": LookaheadMode,
    "early-exit": EarlyExitMode,
    "eagle": EagleMode,
    "eagle-pld": EagleLookupMode,
    "pld": PromptLookupMode,
    "token-recycling": TokenRecyclingMode,
    "pipeline": PipelineMode,
    "async": AsyncDraftMode,
}


# The modes a server offers besides its own by default ([server] allowed_modes): lossless,
# on the engine's one model; not the peers (a model copy each) nor the pipelined modes
# (Ray workers of their own).
SINGLE_WORKER_LOSSLESS_MODES = (
    "ar", "ht", "ht-pld", "ht-alone", "ht-recycle", "medusa", "pass", "early-exit", "eagle", "eagle-pld", "pld",
    "token-recycling",
)


def check_mode(name: str) -> None:
    """UnknownModeError, naming the modes there are, unless `name` is one of them."""
    if name not in MODES:
        raise UnknownModeError(f"unknown mode {name!r}; available: {', '.join(MODES)}")


def build_mode(name: str, engine):
    check_mode(name)
    return MODES[name](engine)

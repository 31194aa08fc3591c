"""Decoding modes by name. Each mode turns prompt ids into Steps (runtime.decoding.Step):

    mode.generate(prompt_ids, max_new_tokens) -> Iterator[Step]

Later drafters register here and the CLI and benchmark pick them up by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from runtime.decoding import Step, generate_greedy


class AutoregressiveMode:
    """Plain greedy decoding with our engine: the reference every other mode must equal."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[Step]:
        e = self.engine
        return generate_greedy(e.model, e.cache, prompt_ids, max_new_tokens, e.stop_ids)


class HiddenTransferMode:
    """Hidden-transfer drafts verified as a token tree (runtime.ht_decoding)."""

    with_lookup = False

    def __init__(self, engine):
        from runtime.ht_decoding import HiddenTransferDecoder
        from workers.drafters.hidden_transfer import HiddenTransfer, default_weights_path

        e = engine
        weights = default_weights_path(e.config.checkpoint) if e.ht_config.weights == "default" else e.ht_config.weights
        ht = HiddenTransfer.load(weights, e.model.args).to(e.model.device)
        self.engine = e
        self.decoder = HiddenTransferDecoder(e.model, ht, e.cache, e.ht_config, self.lookup_drafter(e))

    def lookup_drafter(self, engine):
        return PromptLookupMode.build_drafter(engine) if self.with_lookup else None

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[Step]:
        return self.decoder.generate(prompt_ids, max_new_tokens, self.engine.stop_ids)


class TreeDrafterMode:
    """A drafter from workers/drafters proposes a token tree each step; runtime.tree_decoding
    verifies it. Subclasses build the drafter from the engine's config."""

    def __init__(self, engine):
        from runtime.tree_decoding import TreeDecoder

        self.engine = engine
        self.decoder = TreeDecoder(engine.model, engine.cache, self.build_drafter(engine))

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[Step]:
        return self.decoder.generate(prompt_ids, max_new_tokens, self.engine.stop_ids)


class PromptLookupMode(TreeDrafterMode):
    @staticmethod
    def build_drafter(engine):
        from workers.drafters.prompt_lookup import PromptLookupDrafter

        c = engine.pld_config
        return PromptLookupDrafter(c.min_ngram, c.max_ngram, c.depth)


class TokenRecyclingMode(TreeDrafterMode):
    @staticmethod
    def build_drafter(engine):
        from workers.drafters.token_recycling import TokenRecyclingDrafter

        c = engine.token_recycling_config
        return TokenRecyclingDrafter(engine.model.args.vocab_size, c.top_k, c.budget)


class HiddenTransferLookupMode(HiddenTransferMode):
    """`ht` trees with the prompt-lookup chain of the [pld] settings grafted on."""

    with_lookup = True


def _hf(prompt_lookup: bool) -> Callable:
    def build(engine):
        from runtime.hf_peers import HfGenerateMode

        return HfGenerateMode(engine, prompt_lookup=prompt_lookup)

    return build


MODES: dict[str, Callable] = {
    "ar": AutoregressiveMode,
    "ht": HiddenTransferMode,
    "ht-pld": HiddenTransferLookupMode,
    "hf": _hf(prompt_lookup=False),
    "hf-pld": _hf(prompt_lookup=True),
    "pld": PromptLookupMode,
    "token-recycling": TokenRecyclingMode,
}


class UnknownModeError(ValueError):
    pass


def build_mode(name: str, engine):
    if name not in MODES:
        raise UnknownModeError(f"unknown mode {name!r}; available: {', '.join(MODES)}")
    return MODES[name](engine)

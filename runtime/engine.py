"""The engine: one model, its tokenizer and KV cache, and the decoding modes over them."""

from __future__ import annotations

from collections.abc import Iterator

from runtime.chat import encode_chat, stop_ids
from runtime.config import HtConfig, ModelConfig, PldConfig, TokenRecyclingConfig
from runtime.decoding import Step
from workers.loading import load_model, load_tokenizer


class PromptTooLongError(ValueError):
    pass


# Cache slots beyond max_context for the pending positions of a tree step
# (tree nodes plus pseudo states), which are written before acceptance trims them.
TREE_HEADROOM = 512


class Engine:
    def __init__(
        self,
        config: ModelConfig,
        ht: HtConfig | None = None,
        pld: PldConfig | None = None,
        token_recycling: TokenRecyclingConfig | None = None,
    ):
        self.config = config
        self.ht_config = ht or HtConfig()
        self.pld_config = pld or PldConfig()
        self.token_recycling_config = token_recycling or TokenRecyclingConfig()
        self.model, self.folder = load_model(config.checkpoint, config.torch_dtype(), config.torch_device())
        self.tokenizer = load_tokenizer(self.folder)
        self.cache = self.model.new_cache(config.max_context + TREE_HEADROOM)
        self.stop_ids = stop_ids(self.tokenizer, self.folder)
        self._modes: dict[str, object] = {}

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

    def set_ht_config(self, ht: HtConfig) -> None:
        """Use other hidden-transfer settings; the `ht` modes are rebuilt on their next use."""
        self.ht_config = ht
        for name in ("ht", "ht-pld"):
            self._modes.pop(name, None)

    def steps(self, prompt_ids: list[int], mode: str, max_new_tokens: int) -> Iterator[Step]:
        self.check_fits(prompt_ids, max_new_tokens)
        return self.mode(mode).generate(prompt_ids, max_new_tokens)

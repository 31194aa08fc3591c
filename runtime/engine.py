"""The engine: one model, its tokenizer and KV cache, and the decoding modes over them."""

from __future__ import annotations

from collections.abc import Iterator

from runtime.config import HtConfig, ModelConfig
from runtime.decoding import Step
from workers.loading import load_model, load_tokenizer


class PromptTooLongError(ValueError):
    pass


# Cache slots beyond max_context for the pending positions of a tree step
# (tree nodes plus pseudo states), which are written before acceptance trims them.
TREE_HEADROOM = 512


class Engine:
    def __init__(self, config: ModelConfig, ht: HtConfig | None = None):
        self.config = config
        self.ht_config = ht or HtConfig()
        self.model, self.folder = load_model(config.checkpoint, config.torch_dtype(), config.torch_device())
        self.tokenizer = load_tokenizer(self.folder)
        self.cache = self.model.new_cache(config.max_context + TREE_HEADROOM)
        self.stop_ids = self._stop_ids()
        self._modes: dict[str, object] = {}

    def _stop_ids(self) -> set[int]:
        from transformers import GenerationConfig

        ids = {self.tokenizer.eos_token_id}
        try:
            eos = GenerationConfig.from_pretrained(self.folder).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    def encode_chat(self, prompt: str | list[dict]) -> list[int]:
        """A user prompt (or a list of chat messages) -> prompt token ids, with the chat template."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.tokenizer.chat_template is None:
            return self.tokenizer.encode("\n".join(m["content"] for m in messages))
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

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

    def steps(self, prompt_ids: list[int], mode: str, max_new_tokens: int) -> Iterator[Step]:
        self.check_fits(prompt_ids, max_new_tokens)
        return self.mode(mode).generate(prompt_ids, max_new_tokens)

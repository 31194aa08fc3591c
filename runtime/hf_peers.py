"""Hugging Face `generate` as peer modes: greedy, and greedy with prompt lookup decoding.

They load transformers' own model from the same checkpoint folder, dtype and device as
the engine. transformers returns the whole reply at the end, so each call yields one
Step; a forward pre-hook counts the model's forward passes for mean_accepted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from runtime.decoding import Step

PROMPT_LOOKUP_TOKENS = 10  # candidate tokens per lookup, as in transformers' documentation


class HfGenerateMode:
    def __init__(self, engine, prompt_lookup: bool):
        from transformers import AutoModelForCausalLM

        self.engine = engine
        self.prompt_lookup = prompt_lookup
        self.model = AutoModelForCausalLM.from_pretrained(engine.folder, dtype=engine.model.dtype)
        self.model.to(engine.model.device).eval()
        self.forward_passes = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.forward_passes += 1

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[Step]:
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        extra = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if self.prompt_lookup else {}
        self.forward_passes = 0
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(self.engine.stop_ids),
            pad_token_id=self.engine.tokenizer.pad_token_id or sorted(self.engine.stop_ids)[0],
            **extra,
        )
        yield Step(out[0, len(prompt_ids) :].tolist(), None, forward_passes=self.forward_passes)

"""Hugging Face `generate` as peer modes: plain (`hf`), with prompt lookup decoding
(`hf-pld`), and assisted generation with the draft model (`hf-draft`: `assistant_model`,
the [draft] checkpoint, as transformers users run a draft model).

With sampling they use transformers' own sampler (seeded with torch.manual_seed): the
same distribution as ours, but not the same draws, so the benchmark cannot compare
their sampled tokens with `ar`'s one by one.

They load transformers' own model from the same checkpoint folder, dtype and device as
the engine. transformers returns the whole reply at the end, so each call yields one
Step; a forward pre-hook counts the model's forward passes for mean_accepted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from configs.schema import SamplingConfig
from runtime.decoding.steps import Step
from workers.drafters.draft_model import draft_checkpoint
from workers.loading import resolve_checkpoint

PROMPT_LOOKUP_TOKENS = 10  # candidate tokens per lookup, as in transformers' documentation


# The peers' own samplers divide the logits by the temperature as they are, so a
# temperature like 1e-40 makes them inf and the draw noise. Below this bound the peers
# decode greedily: float32 logits of this model's size (|x| ~ 10-30) are at least ~1e-6
# apart unless equal, so such a temperature picks the top token anyway (ours sample
# exactly at any temperature: workers.sampling).
PEER_MIN_TEMPERATURE = 1e-6


def peer_samples(sampling: SamplingConfig | None) -> bool:
    """Whether a peer (hf, hf-pld, llama.cpp) samples; False: it decodes greedily."""
    return sampling is not None and sampling.temperature >= PEER_MIN_TEMPERATURE


class HfGenerateMode:
    same_draws_as_ar = False  # sampled tokens follow transformers' RNG, not workers.sampling

    def __init__(self, engine, prompt_lookup: bool = False, assisted: bool = False):
        from transformers import AutoModelForCausalLM

        self.engine = engine
        self.prompt_lookup = prompt_lookup
        self.model = AutoModelForCausalLM.from_pretrained(engine.folder, dtype=engine.model.dtype)
        self.model.to(engine.model.device).eval()
        self.assistant = None
        if assisted:
            name = draft_checkpoint(engine.drafters.draft.checkpoint, engine.config.checkpoint)
            self.assistant = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(name), dtype=engine.model.dtype)
            self.assistant.to(engine.model.device).eval()
        self.forward_passes = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.forward_passes += 1

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None) -> Iterator[Step]:
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        extra = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if self.prompt_lookup else {}
        if self.assistant is not None:
            extra["assistant_model"] = self.assistant
        sample = peer_samples(sampling)
        if sample:
            torch.manual_seed(sampling.seed)
            extra.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        self.forward_passes = 0
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            eos_token_id=sorted(self.engine.stop_ids),
            pad_token_id=self.engine.tokenizer.pad_token_id or sorted(self.engine.stop_ids)[0],
            **extra,
        )
        yield Step(out[0, len(prompt_ids) :].tolist(), None, forward_passes=self.forward_passes)

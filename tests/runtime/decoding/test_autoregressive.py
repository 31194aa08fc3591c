"""Plain decoding (runtime.decoding.autoregressive) through the KV cache, against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from runtime.decoding.autoregressive import generate_ar

PROMPT = [1, 17, 42, 99, 5, 63]
N_NEW = 20


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # never stop early: compare all n tokens
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral_window"])
def test_generate_ar_matches_transformers(tiny_models, kind):
    model, hf = tiny_models(kind)
    expected = hf_greedy(hf, PROMPT, N_NEW)
    assert len(expected) == N_NEW
    cache = model.new_cache(64)
    steps = list(generate_ar(model, cache, PROMPT, N_NEW, stop_ids=set()))
    assert all(len(s.tokens) == 1 and s.forward_passes == 1 for s in steps)
    assert all(len(s.margins) == 1 and s.margins[0] >= 0 for s in steps)
    assert [s.tokens[0] for s in steps] == expected
    # Prompt + every generated token but the last went through the cache.
    assert cache.length == len(PROMPT) + N_NEW - 1


def test_generate_ar_stops_at_stop_token_and_reuses_cache(tiny_models):
    model, _ = tiny_models("llama")
    cache = model.new_cache(64)
    full = [s.tokens[0] for s in generate_ar(model, cache, PROMPT, 10, stop_ids=set())]
    # A second run on the same (dirty) cache starts from scratch and gives the same tokens.
    again = [s.tokens[0] for s in generate_ar(model, cache, PROMPT, 10, stop_ids=set())]
    assert again == full
    stop = full[4]
    first = full.index(stop)
    stopped = [s.tokens[0] for s in generate_ar(model, cache, PROMPT, 10, stop_ids={stop})]
    assert stopped == full[: first + 1]  # the stop token itself is yielded, nothing after it

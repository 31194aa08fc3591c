"""Tree decoding of drafters that propose from outside the model (runtime.decoding.tree_decoder:
prompt lookup, token recycling, early exit), and `ht-pld`, the prompt-lookup chain on
hidden-transfer trees: lossless on the real model, greedy and sampled."""

import pytest

from configs.schema import DrafterConfigs, EarlyExitConfig, ModelConfig, PldConfig, SamplingConfig, TokenRecyclingConfig
from runtime.engine import Engine

PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, apple, banana, cherry.",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def engine():
    drafters = DrafterConfigs(pld=PldConfig(min_ngram=1, max_ngram=3, depth=6),
                              token_recycling=TokenRecyclingConfig(top_k=6, budget=12))
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=1024), drafters)


@pytest.mark.parametrize("mode", ["pld", "token-recycling", "ht-pld"])
def test_drafters_identical_to_ar(engine, mode):
    accepted_more_than_one = False
    for prompt in PROMPTS:
        ids = engine.encode_chat(prompt)
        ar = [t for s in engine.steps(ids, "ar", 48) for t in s.tokens]
        steps = list(engine.steps(ids, mode, 48))
        assert [t for s in steps for t in s.tokens] == ar
        assert all(len(s.margins) == len(s.tokens) for s in steps)
        accepted_more_than_one |= any(len(s.tokens) > 1 for s in steps)
    assert accepted_more_than_one  # the drafts were used, not just the bonus token


@pytest.mark.parametrize("mode", ["ht", "pld", "token-recycling", "ht-pld"])
def test_sampled_drafters_draw_ar_tokens(engine, mode):
    """Same seed, same tokens as ar's sampling (workers.sampling), with top-k and top-p."""
    accepted_more_than_one = False
    for prompt, sampling in zip(PROMPTS, [SamplingConfig(0.7, 0, 0.9, seed=1), SamplingConfig(1.0, 20, 1.0, seed=2)]):
        ids = engine.encode_chat(prompt)
        ar = [t for s in engine.steps(ids, "ar", 40, sampling) for t in s.tokens]
        steps = list(engine.steps(ids, mode, 40, sampling))
        assert [t for s in steps for t in s.tokens] == ar
        accepted_more_than_one |= any(len(s.tokens) > 1 for s in steps)
    assert ar != [t for s in engine.steps(ids, "ar", 40) for t in s.tokens]  # it sampled: not the greedy reply
    assert accepted_more_than_one


@pytest.mark.parametrize("mode", ["pld", "token-recycling", "ht-pld"])
def test_drafters_respect_max_new_tokens(engine, mode):
    ids = engine.encode_chat(PROMPTS[0])
    for n in (1, 2, 5):
        ar = [t for s in engine.steps(ids, "ar", n) for t in s.tokens]
        assert [t for s in engine.steps(ids, mode, n) for t in s.tokens] == ar


@pytest.mark.parametrize("layer,depth", [(20, 3), (6, 1)])
def test_early_exit_identical_to_ar(engine, layer, depth):
    engine.set_drafter_config("early_exit", EarlyExitConfig(layer=layer, depth=depth))
    accepted_more_than_one = False
    for prompt, sampling in zip(PROMPTS, [None, SamplingConfig(0.7, 0, 0.9, seed=4), None]):
        ids = engine.encode_chat(prompt)
        ar = [t for s in engine.steps(ids, "ar", 40, sampling) for t in s.tokens]
        steps = list(engine.steps(ids, "early-exit", 40, sampling))
        assert [t for s in steps for t in s.tokens] == ar
        assert engine.cache.length < len(ids) + 40 + depth  # the drafts' cache entries were dropped
        accepted_more_than_one |= any(len(s.tokens) > 1 for s in steps)
    assert accepted_more_than_one

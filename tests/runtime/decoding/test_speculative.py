"""The speculative loop (runtime.decoding.speculative) with proposers from outside the
model (prompt lookup, token recycling, early exit, the EAGLE peer), and the prompt-lookup
chain grafted on hidden-transfer and EAGLE trees (`ht`, `eagle-pld`), and any composition
of [speculation] proposers (`spec`): lossless on the real model, greedy and sampled; with
their trees as proposed, and cut by a tree sizer (workers.tree_sizing)."""

import json

import pytest

from configs.schema import (
    ConfigError,
    DrafterConfigs,
    EarlyExitConfig,
    ModelConfig,
    PldConfig,
    SamplingConfig,
    SpeculationConfig,
    TokenRecyclingConfig,
    TreeSizingConfig,
)
from runtime.engine import Engine
from workers.drafters.base import LookupChain, Proposal, TreeProposer
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.tree import TokenTree, root_only

PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, apple, banana, cherry.",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def engine():
    drafters = DrafterConfigs(pld=PldConfig(min_ngram=1, max_ngram=3, depth=6),
                              token_recycling=TokenRecyclingConfig(top_k=6, budget=12),
                              tree_sizing=TreeSizingConfig(cost="off"))  # the trees as proposed
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=1024), drafters)


@pytest.mark.parametrize("mode", ["pld", "token-recycling", "ht", "eagle", "eagle-pld"])
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


@pytest.mark.parametrize("mode", ["ht", "pld", "token-recycling", "eagle", "eagle-pld"])
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


@pytest.mark.parametrize("mode", ["pld", "token-recycling", "ht", "eagle", "eagle-pld"])
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


def synthetic_profile(tmp_path, name: str, ms) -> str:
    """A `leapfrog profile` JSON where a step of n rows costs ms(n) (n = 1..64)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"ms_median": {"128": {str(n): ms(n) for n in range(1, 65)}}}))
    return str(path)


@pytest.mark.parametrize("mode", ["ht", "pld", "token-recycling", "eagle", "eagle-pld"])
def test_sized_trees_identical_to_ar(engine, tmp_path, mode):
    """Free rows keep every proposal; rows that each cost four times the step before keep
    none (only the bonus token each step, even beside ht's pseudo rows); either way, and on
    a CPU-like curve between, the tokens are ar's."""
    tokens_per_step = {}
    curves = {"flat": lambda n: 10.0, "steep": lambda n: 10.0 * 4 ** min(n - 1, 30), "cpu": lambda n: 10 + 1.5 * (n - 1)}
    for name, ms in curves.items():
        engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost=synthetic_profile(tmp_path, name, ms)))
        steps = tokens = 0
        for prompt in PROMPTS:
            ids = engine.encode_chat(prompt)
            ar = [t for s in engine.steps(ids, "ar", 40) for t in s.tokens]
            reply = list(engine.steps(ids, mode, 40))
            assert [t for s in reply for t in s.tokens] == ar, name
            steps, tokens = steps + len(reply), tokens + len(ar)
        tokens_per_step[name] = tokens / steps
    engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost="off"))
    assert tokens_per_step["steep"] == 1.0
    assert tokens_per_step["flat"] > 1.2
    assert tokens_per_step["cpu"] > 1.0


@pytest.mark.parametrize("proposers", [["token-recycling", "pld"], ["early-exit", "pld"], ["medusa", "pld"]])
def test_any_composition_of_proposers_is_lossless(engine, proposers):
    """Mode `spec` decodes with the [speculation] proposers: compositions no preset names,
    greedy and sampled, give ar's tokens, and the chain grafted after the first proposer's
    tree is used."""
    engine.set_drafter_config("speculation", SpeculationConfig(proposers))
    try:
        for prompt, sampling in zip(PROMPTS, [None, SamplingConfig(0.7, 0, 0.9, seed=1)]):
            ids = engine.encode_chat(prompt)
            ar = [t for s in engine.steps(ids, "ar", 40, sampling) for t in s.tokens]
            assert [t for s in engine.steps(ids, "spec", 40, sampling) for t in s.tokens] == ar
        assert [type(p).__name__ for p in engine.mode("spec").decoder.proposers][-1] == "LookupChain"
    finally:
        engine.set_drafter_config("speculation", SpeculationConfig())


@pytest.mark.parametrize("proposers,message", [
    ([], "must name some of"),
    (["ht", "warp"], "must name some of"),
    (["pld", "eagle"], "can only come first"),
    (["ht", "medusa"], "can only come first"),
    (["pld", "pld"], "each at most once"),
])
def test_bad_compositions_are_refused(proposers, message):
    with pytest.raises(ConfigError, match=message):
        DrafterConfigs(speculation=SpeculationConfig(proposers)).validate()


class FixedTree:
    """A drafter that proposes root -> 8 (log p -0.1) and root -> 9 (log p -2.0)."""

    def start(self, prompt_ids):
        pass

    def propose(self, root):
        return TokenTree([root, 8, 9], [-1, 0, 0], [0, 1, 1], [0.0, -0.1, -2.0])


def test_the_lookup_chain_is_grafted_onto_a_drafters_tree():
    """eagle-pld's proposal: the drafter's nodes keep their scores; the chain (8 5 6 after
    ... 5 6 7 | 8 5 6) reuses the drafter's 8 and adds 5 and 6 under it, unscored, each
    with its lookup slot; no lookup, no chain."""
    lookup = LookupChain(PromptLookupDrafter(min_ngram=1, max_ngram=3, depth=3))
    lookup.start([5, 6, 7, 8, 5, 6])
    proposal = Proposal(root_only(7))
    for proposer in (TreeProposer(FixedTree()), lookup):
        proposer.propose(proposal)
    tree, slots = proposal.tree, proposal.slots
    assert tree.tokens == [7, 8, 9, 5, 6] and tree.parents == [-1, 0, 0, 1, 3]
    assert tree.scores[:3] == [0.0, -0.1, -2.0] and tree.scores[3:] == [float("-inf")] * 2
    assert slots == {1: ("lookup", 1), 2: 2, 3: ("lookup", 2), 4: ("lookup", 3)}
    alone = Proposal(root_only(7))
    TreeProposer(FixedTree()).propose(alone)
    assert alone.tree.tokens == [7, 8, 9] and alone.slots == {1: 1, 2: 2}
    with pytest.raises(ValueError, match="must be the first proposer"):
        TreeProposer(FixedTree()).propose(proposal)

"""Drafters verified as token trees (prompt lookup, token recycling, hidden transfer with
grafted prompt lookup): their trees, and lossless decoding on the real model."""

import pytest
import torch

from runtime.config import DrafterConfigs, ModelConfig, PldConfig, SamplingConfig, TokenRecyclingConfig
from runtime.engine import Engine
from workers.drafters.prompt_lookup import PromptLookupDrafter, lookup
from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.tree import DEFAULT_TEMPLATE, build_dynamic_tree, graft_chain, root_only


def test_lookup_prefers_the_longest_then_latest_match():
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    assert lookup(context, 1, 3, 4) == [9, 2, 6, 7]  # "6 7" last seen at 5-6, followed by 9 2 6 7
    assert lookup(context + [9], 1, 3, 2) == [2, 6]  # "6 7 9" at 5-7
    assert lookup([1, 2, 3, 4], 1, 3, 5) == []  # nothing repeats
    assert lookup([4, 1, 2, 4], 1, 3, 5) == [1, 2, 4]  # a 1-gram, continuation up to the end
    assert lookup([3, 3], 2, 3, 5) == []  # below min_ngram


def test_prompt_lookup_drafter_tracks_committed_tokens():
    d = PromptLookupDrafter(1, 3, 3)
    d.start([10, 11, 12, 13])
    tree = d.propose(11)  # context ... 13, 11: "11" matched at 1, followed by 12 13 11
    assert tree.tokens == [11, 12, 13, 11] and tree.parents == [-1, 0, 1, 2] and tree.depths == [0, 1, 2, 3]
    d.observe(tree, [0, 1], torch.zeros(4, 1, dtype=torch.long))  # 11 and 12 accepted
    assert d.context == [10, 11, 12, 13, 11, 12]
    assert d.propose(99).tokens == [99]  # no match: the root alone


def test_token_recycling_tree_follows_the_adjacency_table():
    d = TokenRecyclingDrafter(vocab_size=50, top_k=5, budget=8)
    assert d.propose(3).tokens == [3]  # empty table: root only
    tree = d.propose(3)
    top = torch.tensor([[10, 11, 12, 13, 14]])
    d.observe(tree, [0], top)  # after token 3 the target likes 10, 11, 12, ...
    d.adjacency[10] = torch.tensor([20, 21, 22, 23, 24])
    tree = d.propose(3)
    # DEFAULT_TEMPLATE[:7] = (0,), (0,0), (1,), (0,0,0), (0,1), (2,), (1,0); nothing known after 20 or 11.
    expected = {(0,): 10, (1,): 11, (2,): 12, (0, 0): 20, (0, 1): 21}
    assert sorted(tree.tokens[1:]) == sorted(expected.values())
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        assert parent < node and tree.depths[node] == tree.depths[parent] + 1
    assert len(tree) <= 8


def test_token_recycling_rejects_a_too_small_top_k():
    with pytest.raises(ValueError, match="top_k"):
        TokenRecyclingDrafter(vocab_size=50, top_k=3, budget=8, template=DEFAULT_TEMPLATE)


def test_graft_chain_reuses_matching_nodes_and_scores_new_ones():
    lp = torch.log_softmax(torch.randn(2, 20), dim=-1)
    tree = build_dynamic_tree(7, lp, budget=4, top_k=3)
    first = tree.tokens[1]  # the best depth-1 draft
    n = len(tree)
    graft_chain(tree, [first, 5, 6], lp)
    assert len(tree) <= n + 2  # `first` is reused; 5 (maybe) and 6 are new
    node = tree.tokens.index(6, n)
    assert tree.depths[node] == 3 and tree.scores[node] == float("-inf")  # deeper than the drafts
    path = tree.path_to(node)
    assert [tree.tokens[i] for i in path] == [7, first, 5, 6]
    assert tree.ancestor_mask()[node, path].all()
    lone = graft_chain(root_only(3), [4], None)
    assert lone.tokens == [3, 4] and lone.parents == [-1, 0]


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
    """Same seed, same tokens as ar's sampling (runtime.sampling), with top-k and top-p."""
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


# --------------------------------------------------------------------------- medusa, pass, early-exit

SETTINGS_FIELD = {"ht": "ht", "medusa": "medusa", "pass": "pass_"}


def random_drafter(engine, tmp_path, kind: str, k: int = 3):
    """Weights of `kind` with random noise on their starting point, saved for the engine."""
    from workers.drafters.pseudo_states import PseudoStateConfig, build

    args = engine.model.args
    layer = {"ht": 12, "medusa": args.n_layers, "pass": 0}[kind]
    torch.manual_seed(7)
    drafter = build(PseudoStateConfig(layer=layer, k=k, kind=kind), args.dim)
    for p in drafter.parameters():
        p.data += 0.02 * torch.randn_like(p)
    path = tmp_path / f"{kind}.safetensors"
    drafter.save(path, args)
    return path


@pytest.mark.parametrize("kind", ["medusa", "pass"])
def test_pseudo_state_kinds_identical_to_ar(engine, tmp_path, kind):
    from runtime.config import HtConfig

    engine.set_drafter_config(SETTINGS_FIELD[kind], HtConfig(weights=str(random_drafter(engine, tmp_path, kind)), budget=10))
    sampling = SamplingConfig(0.8, 0, 0.95, seed=3)
    for prompt in PROMPTS[:2]:
        ids = engine.encode_chat(prompt)
        for how in (None, sampling):
            ar = [t for s in engine.steps(ids, "ar", 32, how) for t in s.tokens]
            assert [t for s in engine.steps(ids, kind, 32, how) for t in s.tokens] == ar, how


def test_weights_of_another_kind_are_refused(engine, tmp_path):
    from runtime.config import HtConfig
    from workers.drafters.pseudo_states import DrafterWeightsError

    engine.set_drafter_config("ht", HtConfig(weights=str(random_drafter(engine, tmp_path, "medusa"))))
    with pytest.raises(DrafterWeightsError, match="holds a medusa drafter, not a ht one"):
        engine.mode("ht")
    engine.set_drafter_config("ht", HtConfig())


@pytest.mark.parametrize("layer,depth", [(20, 3), (6, 1)])
def test_early_exit_identical_to_ar(engine, layer, depth):
    from runtime.config import EarlyExitConfig

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


@pytest.mark.parametrize("kind", ["medusa", "pass"])
def test_shipped_weights_are_trained_and_lossless(engine, kind):
    from runtime.config import HtConfig
    from workers.drafters.pseudo_states import PseudoStateConfig, build, load, shipped_weights

    drafter = load(shipped_weights("default", kind), engine.model.args)
    assert drafter.config.kind == kind and drafter.training_summary["steps"] > 0
    fresh = build(PseudoStateConfig(drafter.config.layer, drafter.config.k, kind=kind), engine.model.args.dim)
    assert any(not torch.equal(a, b) for a, b in zip(drafter.parameters(), fresh.parameters()))  # trained
    engine.set_drafter_config(SETTINGS_FIELD[kind], HtConfig())  # weights = "default": the shipped file
    ids = engine.encode_chat(PROMPTS[1])
    steps = list(engine.steps(ids, kind, 48))
    assert [t for s in steps for t in s.tokens] == [t for s in engine.steps(ids, "ar", 48) for t in s.tokens]
    assert len(steps) < 48  # the trained drafts are accepted: fewer steps than tokens

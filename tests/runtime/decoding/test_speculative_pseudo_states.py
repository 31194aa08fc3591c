"""The speculative loop with pseudo-state drafts (workers.drafters.pseudo_proposer: ht,
medusa, pass) is lossless: identical tokens to `ar` whatever the weights and the tree,
greedy and sampled."""

import pytest
import torch

from configs.schema import (
    DrafterConfigs,
    HiddenTransferModeConfig,
    ModelConfig,
    PseudoStateModeConfig,
    SamplingConfig,
    TreeSizingConfig,
)
from runtime.engine import Engine
from workers.drafters.hidden_transfer import HiddenTransfer
from workers.drafters.loading import DrafterWeightsError, build, load, shipped_weights
from workers.drafters.pseudo_forward import run_to_end
from workers.drafters.base import Proposal
from workers.drafters.pseudo_states import PseudoStateConfig
from workers.sampling import Greedy
from workers.tree import root_only
from workers.tree_sizing import Load
from workers.tree_step import tree_step

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colours of the rainbow, one per line.",
]


def perturbed_transfer(args, layer, k, pseudo_attention, seed):
    torch.manual_seed(seed)
    ht = HiddenTransfer(PseudoStateConfig(layer=layer, k=k, pseudo_attention=pseudo_attention), args.dim)
    ht.transfer.data += 0.02 * torch.randn_like(ht.transfer)
    return ht


@pytest.fixture(scope="module")
def engine():
    # The trees as configured (cut by a sizer: test_sized_trees_identical_to_ar in test_speculative.py).
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=1024), DrafterConfigs(tree_sizing=TreeSizingConfig(cost="off")))


def greedy_tokens(engine, mode, prompt, n):
    return [t for s in engine.steps(engine.encode_chat(prompt), mode, n) for t in s.tokens]


@pytest.mark.parametrize(
    "layer,k,pseudo_attention,budget,top_k,pseudo_nodes,depth",
    [
        (15, 3, True, 16, 8, 8, 0),
        (24, 4, False, 24, 4, 24, 0),
        (6, 2, True, 5, 2, 1, 0),
        (15, 4, True, 12, 8, 3, 0),
        (10, 4, True, 10, 4, 4, 2),  # only the first 2 of 4 maps
    ],
)
def test_ht_identical_to_ar(engine, tmp_path, layer, k, pseudo_attention, budget, top_k, pseudo_nodes, depth):
    weights = tmp_path / "ht.safetensors"
    perturbed_transfer(engine.model.args, layer, k, pseudo_attention, seed=layer).save(weights, engine.model.args)
    engine.set_drafter_config("ht", PseudoStateModeConfig(weights=str(weights), budget=budget, top_k=top_k,
                                  pseudo_nodes=pseudo_nodes, depth=depth))
    accepted = 0
    for prompt in PROMPTS:
        ar = greedy_tokens(engine, "ar", prompt, 48)
        steps = list(engine.steps(engine.encode_chat(prompt), "ht", 48))
        assert [t for s in steps for t in s.tokens] == ar
        assert all(len(s.margins) == len(s.tokens) for s in steps)
        accepted += sum(len(s.tokens) - 1 for s in steps)
    assert accepted > 0  # some draft was accepted: a decoder that rejects every draft fails here


def test_ht_respects_max_new_tokens_and_stop(engine, tmp_path):
    weights = tmp_path / "ht.safetensors"
    perturbed_transfer(engine.model.args, 15, 3, True, seed=1).save(weights, engine.model.args)
    engine.set_drafter_config("ht", PseudoStateModeConfig(weights=str(weights)))
    for n in (1, 2, 7):
        assert greedy_tokens(engine, "ht", PROMPTS[1], n) == greedy_tokens(engine, "ar", PROMPTS[1], n)
    full = greedy_tokens(engine, "ht", PROMPTS[0], 200)
    assert full[-1] in engine.stop_ids and len(full) < 200  # stopped at EOS, not after it


def test_weights_that_do_not_fit_the_model(engine, tmp_path):
    args = engine.model.args
    with pytest.raises(DrafterWeightsError, match="do not exist"):
        load(tmp_path / "missing.safetensors", args)
    other = args.__class__(**{**args.__dict__, "dim": 64, "n_layers": 4})
    HiddenTransfer(PseudoStateConfig(layer=2, k=2), 64).save(tmp_path / "small.safetensors", other)
    with pytest.raises(DrafterWeightsError, match="trained for a model"):
        load(tmp_path / "small.safetensors", args)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DrafterWeightsError, match="not a Leapfrog"):
        load(tmp_path / "foreign.safetensors", args)


def test_shipped_weights_load_and_stay_lossless(engine):
    ht = load(shipped_weights("default", "ht"), engine.model.args)
    assert 0 < ht.config.layer < engine.model.args.n_layers and ht.config.k >= 1
    assert not torch.equal(ht.transfer, HiddenTransfer(ht.config, engine.model.args.dim).transfer)  # trained
    engine.set_drafter_config("ht", PseudoStateModeConfig())  # weights = "default": the shipped file
    steps = list(engine.steps(engine.encode_chat(PROMPTS[1]), "ht", 48))
    assert [t for s in steps for t in s.tokens] == greedy_tokens(engine, "ar", PROMPTS[1], 48)
    assert len(steps) < 48  # the trained drafts are accepted: fewer steps than tokens


def test_first_maps_draft_like_the_full_transfer(engine):
    """Pseudo state j never sees states > j, so the first 2 maps give the full module's first 2 drafts."""
    full = perturbed_transfer(engine.model.args, 12, 4, True, seed=3)
    ids = engine.encode_chat(PROMPTS[0])
    drafts = []
    with torch.inference_mode():
        for ht in (full, full.first(2)):
            engine.cache.truncate(0)
            steps = tree_step(engine.model, engine.cache, root_only(ids[-1]), Greedy(), 0, ids[:-1], ht, [0])
            drafts.append(run_to_end(steps).drafts)
    engine.cache.truncate(0)
    assert drafts[1].shape[0] == 2
    torch.testing.assert_close(drafts[1], drafts[0][:2], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="k must be in"):
        full.first(5)


# --------------------------------------------------------------------------- medusa, pass

SETTINGS_FIELD = {"ht": "ht", "medusa": "medusa", "pass": "pass_"}


def random_drafter(engine, tmp_path, kind: str, k: int = 3):
    """Weights of `kind` with random noise on their starting point, saved for the engine."""
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
    engine.set_drafter_config(SETTINGS_FIELD[kind], PseudoStateModeConfig(weights=str(random_drafter(engine, tmp_path, kind)), budget=10))
    sampling = SamplingConfig(0.8, 0, 0.95, seed=3)
    for prompt in PROMPTS[:2]:
        ids = engine.encode_chat(prompt)
        for how in (None, sampling):
            ar = [t for s in engine.steps(ids, "ar", 32, how) for t in s.tokens]
            assert [t for s in engine.steps(ids, kind, 32, how) for t in s.tokens] == ar, how


def test_weights_of_another_kind_are_refused(engine, tmp_path):
    engine.set_drafter_config("ht", PseudoStateModeConfig(weights=str(random_drafter(engine, tmp_path, "medusa"))))
    with pytest.raises(DrafterWeightsError, match="holds a medusa drafter, not a ht one"):
        engine.mode("ht")
    engine.set_drafter_config("ht", PseudoStateModeConfig())


@pytest.mark.parametrize("kind", ["medusa", "pass"])
def test_shipped_weights_are_trained_and_lossless(engine, kind):
    drafter = load(shipped_weights("default", kind), engine.model.args)
    assert drafter.config.kind == kind and drafter.training_summary["steps"] > 0
    fresh = build(PseudoStateConfig(drafter.config.layer, drafter.config.k, kind=kind), engine.model.args.dim)
    assert any(not torch.equal(a, b) for a, b in zip(drafter.parameters(), fresh.parameters()))  # trained
    engine.set_drafter_config(SETTINGS_FIELD[kind], PseudoStateModeConfig())  # weights = "default": the shipped file
    ids = engine.encode_chat(PROMPTS[1])
    steps = list(engine.steps(ids, kind, 48))
    assert [t for s in steps for t in s.tokens] == [t for s in engine.steps(ids, "ar", 48) for t in s.tokens]
    assert len(steps) < 48  # the trained drafts are accepted: fewer steps than tokens


def tree_from(proposer, root, drafts):
    proposer.drafts, proposal = drafts, Proposal(root_only(root))
    proposer.propose(proposal)
    return proposal.tree


def test_shipped_prior_rescores_the_trees_and_stays_lossless(engine):
    """[ht] prior = "default" loads the shipped successor prior: other trees, the same tokens."""
    engine.set_drafter_config("ht", HiddenTransferModeConfig())
    proposer = engine.mode("ht-alone").decoder.pseudo
    assert proposer.prior is not None and len(proposer.prior.weights) == proposer.by_depth[proposer.max_depth].config.k
    for prompt in PROMPTS:
        assert greedy_tokens(engine, "ht-alone", prompt, 48) == greedy_tokens(engine, "ar", prompt, 48)
    drafts = torch.zeros(proposer.max_depth, engine.model.args.vocab_size)  # flat drafts: the prior decides
    with_prior = tree_from(proposer, 28, drafts)
    proposer.prior = None
    assert tree_from(proposer, 28, drafts).tokens != with_prior.tokens
    engine.set_drafter_config("ht", HiddenTransferModeConfig(prior="off"))
    assert engine.mode("ht-alone").decoder.pseudo.prior is None
    engine.set_drafter_config("ht", HiddenTransferModeConfig())


def test_first_step_drafts_as_deep_as_the_pass_pays(engine, tmp_path):
    """A reply's first step drafts at least one depth alone (a probe), but with other
    replies in the pass only as deep as pays there: none when a tree step costs the pass
    more than its drafts are worth."""
    from tests.runtime.decoding.test_speculative import synthetic_profile

    engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost=synthetic_profile(tmp_path, "cpu", lambda n: 10 + n)))
    try:
        decoder = engine.mode("ht").decoder
        decoder.depth = 0  # the last reply gave drafting up
        assert decoder.first_depth(100) == 1
        lane = decoder.lane
        lane.others = lambda: Load(7.0, 7.0, lambda rows: 10 + rows, 20.0)  # a tree step's host work holds the pass up
        assert decoder.first_depth(100) == 0
        lane.others = lambda: Load(7.0, 7.0, lambda rows: 10 + 0.001 * rows)  # rows nearly free, no host work
        assert decoder.first_depth(100) == decoder.pseudo.max_depth
    finally:
        engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost="off"))

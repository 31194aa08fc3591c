"""Hidden-transfer decoding is lossless: identical tokens to `ar` whatever the weights and tree."""

import pytest
import torch

from runtime.config import HtConfig, ModelConfig
from runtime.engine import Engine
from workers.drafters.hidden_transfer import HiddenTransfer
from workers.drafters.pseudo_states import DrafterWeightsError, PseudoStateConfig, load, shipped_weights

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
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=1024))


def greedy_tokens(engine, mode, prompt, n):
    return [t for s in engine.steps(engine.encode_chat(prompt), mode, n) for t in s.tokens]


@pytest.mark.parametrize(
    "layer,k,pseudo_attention,tree,budget,top_k,pseudo_nodes,depth",
    [
        (15, 3, True, "dynamic", 16, 8, 8, 0),
        (24, 4, False, "dynamic", 24, 4, 24, 0),
        (6, 2, True, "dynamic", 5, 2, 1, 0),
        (15, 4, True, "template", 12, 8, 3, 0),
        (10, 4, True, "dynamic", 10, 4, 4, 2),  # only the first 2 of 4 maps
    ],
)
def test_ht_identical_to_ar(engine, tmp_path, layer, k, pseudo_attention, tree, budget, top_k, pseudo_nodes, depth):
    weights = tmp_path / "ht.safetensors"
    perturbed_transfer(engine.model.args, layer, k, pseudo_attention, seed=layer).save(weights, engine.model.args)
    engine.set_drafter_config("ht", HtConfig(weights=str(weights), tree=tree, budget=budget, top_k=top_k,
                                  pseudo_nodes=pseudo_nodes, depth=depth))
    for prompt in PROMPTS:
        ar = greedy_tokens(engine, "ar", prompt, 48)
        steps = list(engine.steps(engine.encode_chat(prompt), "ht", 48))
        assert [t for s in steps for t in s.tokens] == ar
        assert all(len(s.margins) == len(s.tokens) for s in steps)


def test_ht_respects_max_new_tokens_and_stop(engine, tmp_path):
    weights = tmp_path / "ht.safetensors"
    perturbed_transfer(engine.model.args, 15, 3, True, seed=1).save(weights, engine.model.args)
    engine.set_drafter_config("ht", HtConfig(weights=str(weights)))
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
    engine.set_drafter_config("ht", HtConfig())  # weights = "default": the shipped file
    steps = list(engine.steps(engine.encode_chat(PROMPTS[1]), "ht", 48))
    assert [t for s in steps for t in s.tokens] == greedy_tokens(engine, "ar", PROMPTS[1], 48)
    assert len(steps) < 48  # the trained drafts are accepted: fewer steps than tokens


def test_first_maps_draft_like_the_full_transfer(engine):
    """Pseudo state j never sees states > j, so the first 2 maps give the full module's first 2 drafts."""
    from runtime.ht_decoding import transfer_forward

    full = perturbed_transfer(engine.model.args, 12, 4, True, seed=3)
    ids = engine.encode_chat(PROMPTS[0])
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    drafts = []
    with torch.inference_mode():
        for ht in (full, full.first(2)):
            engine.cache.truncate(0)
            pseudo = transfer_forward(engine.model, ht, engine.cache, ids, torch.arange(n), causal, [n - 1])[1]
            drafts.append(engine.model.lm_head(pseudo))
    engine.cache.truncate(0)
    assert drafts[1].shape[1] == 2
    torch.testing.assert_close(drafts[1], drafts[0][:, :2], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="k must be in"):
        full.first(5)

"""Hidden-transfer decoding is lossless: identical tokens to `ar` whatever the weights and tree."""

import pytest
import torch

from runtime.config import HtConfig, ModelConfig
from runtime.engine import Engine
from workers.drafters.hidden_transfer import DrafterWeightsError, HiddenTransfer, HiddenTransferConfig

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colours of the rainbow, one per line.",
]


def perturbed_transfer(args, layer, k, pseudo_attention, seed):
    torch.manual_seed(seed)
    ht = HiddenTransfer(HiddenTransferConfig(layer=layer, k=k, pseudo_attention=pseudo_attention), args.dim)
    ht.transfer.data += 0.02 * torch.randn_like(ht.transfer)
    return ht


@pytest.fixture(scope="module")
def engine():
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=1024))


def greedy_tokens(engine, mode, prompt, n):
    return [t for s in engine.steps(engine.encode_chat(prompt), mode, n) for t in s.tokens]


@pytest.mark.parametrize(
    "layer,k,pseudo_attention,budget,top_k,pseudo_nodes",
    [(15, 3, True, 16, 8, 8), (24, 4, False, 24, 4, 24), (6, 2, True, 5, 2, 1)],
)
def test_ht_identical_to_ar(engine, tmp_path, layer, k, pseudo_attention, budget, top_k, pseudo_nodes):
    weights = tmp_path / "ht.safetensors"
    perturbed_transfer(engine.model.args, layer, k, pseudo_attention, seed=layer).save(weights, engine.model.args)
    engine.ht_config = HtConfig(weights=str(weights), budget=budget, top_k=top_k, pseudo_nodes=pseudo_nodes)
    engine._modes.pop("ht", None)
    for prompt in PROMPTS:
        ar = greedy_tokens(engine, "ar", prompt, 48)
        steps = list(engine.steps(engine.encode_chat(prompt), "ht", 48))
        assert [t for s in steps for t in s.tokens] == ar
        assert all(len(s.margins) == len(s.tokens) for s in steps)
    engine._modes.pop("ht", None)


def test_ht_respects_max_new_tokens_and_stop(engine, tmp_path):
    weights = tmp_path / "ht.safetensors"
    perturbed_transfer(engine.model.args, 15, 3, True, seed=1).save(weights, engine.model.args)
    engine.ht_config = HtConfig(weights=str(weights))
    engine._modes.pop("ht", None)
    for n in (1, 2, 7):
        assert greedy_tokens(engine, "ht", PROMPTS[1], n) == greedy_tokens(engine, "ar", PROMPTS[1], n)
    full = greedy_tokens(engine, "ht", PROMPTS[0], 200)
    assert full[-1] in engine.stop_ids and len(full) < 200  # stopped at EOS, not after it
    engine._modes.pop("ht", None)


def test_weights_that_do_not_fit_the_model(engine, tmp_path):
    args = engine.model.args
    with pytest.raises(DrafterWeightsError, match="do not exist"):
        HiddenTransfer.load(tmp_path / "missing.safetensors", args)
    other = args.__class__(**{**args.__dict__, "dim": 64, "n_layers": 4})
    HiddenTransfer(HiddenTransferConfig(layer=2, k=2), 64).save(tmp_path / "small.safetensors", other)
    with pytest.raises(DrafterWeightsError, match="trained for a model"):
        HiddenTransfer.load(tmp_path / "small.safetensors", args)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DrafterWeightsError, match="not a Leapfrog"):
        HiddenTransfer.load(tmp_path / "foreign.safetensors", args)

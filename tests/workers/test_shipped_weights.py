"""weights = "shipped": the default model's linear layers multiply the GGUF file's own blocks.

The file's blocks, read, un-permuted and fused by workers.gguf_weights, de-quantize to
exactly the weights transformers' GGUF loader wrote into the float checkpoint; and a tree
mode over the shipped weights decodes `ar`'s tokens over the same weights (lossless means:
the same quantized model, tree against plain).
"""

from __future__ import annotations

import pytest
import torch

from configs.schema import ConfigError, DrafterConfigs, LeapfrogConfig, ModelConfig, PipelineConfig, TreeSizingConfig
from workers.gguf_weights import read_shipped
from workers.kernels.choice import native_unsupported
from workers.kernels.quant_blocks import dequantize, format_of
from workers.cache_dir import cache_dir
from workers.loading import ModelLoadError, default_gguf_path, load_model

pytestmark = pytest.mark.real_model


def test_shipped_blocks_are_the_converted_checkpoint_s_weights(real_model):
    """Every linear weight of the float model (de-quantized by transformers) is our
    de-quantization of the file's blocks, bit for bit: names, fusion and the q/k rows'
    un-permutation all right. The tied LM head reads the embedding table's Q8_0 blocks."""
    model, _, _ = real_model
    shipped, left = read_shipped(default_gguf_path(), model.args.n_layers, model.args.tie_embeddings)
    assert left == [] and len(shipped) == 4 * model.args.n_layers + 1
    params = dict(model.named_parameters()) | {"lm_head.weight": model.lm_head.weight}  # tied: one parameter, two names
    for name, blocks in shipped.items():
        assert torch.equal(dequantize(blocks), params[name]), name
    assert format_of(shipped["lm_head.weight"]) == "Q8_0" and format_of(shipped["layers.0.self_attn.qkv_proj.weight"]) == "Q4_1"


@pytest.mark.parametrize("weights", ["shipped", "shipped-int8"])
def test_shipped_float32_forward_is_close_to_the_float_model(real_model, chat_prompt_ids, weights):
    """shipped: the same weights, summed in another order; shipped-int8: x rounded to 8 bits
    a value (of its block's largest) before each product, as llama.cpp does: further off,
    the same greedy tokens here."""
    model, _, _ = real_model
    shipped, _ = load_model("default", torch.float32, "cpu", weights=weights)
    blocks = torch.uint8 if weights == "shipped" else torch.int8
    assert shipped.lm_head.weight.dtype == blocks and shipped.embed_tokens.weight.dtype == torch.float32
    tokens = torch.tensor([chat_prompt_ids])
    positions = torch.arange(tokens.shape[1])
    with torch.no_grad():
        got = shipped(tokens, shipped.context(positions))
        want = model(tokens, model.context(positions))
    if weights == "shipped":
        torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
    else:
        assert (got - want).abs().mean() < 0.5 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_shipped_weights_need_a_gguf_checkpoint_on_the_cpu(real_model):
    _, _, folder = real_model
    with pytest.raises(ModelLoadError, match="needs a GGUF checkpoint"):
        load_model(str(folder), weights="shipped")
    with pytest.raises(ModelLoadError, match="CPU kernels only"):
        load_model("default", device="meta", weights="shipped")
    with pytest.raises(ConfigError, match="weights must be one of float, shipped, shipped-int8"):
        LeapfrogConfig(model=ModelConfig(weights="int4")).validate()


@pytest.mark.skipif(native_unsupported(torch.device("cpu"), torch.bfloat16) is not None, reason="native kernels unavailable")
@pytest.mark.parametrize("weights", ["shipped", "shipped-int8"])
def test_tree_modes_over_shipped_weights_decode_ar_s_tokens(weights):
    from runtime.engine import Engine

    e = Engine(ModelConfig(dtype="bfloat16", device="cpu", max_context=512, kernels="native", weights=weights),
               DrafterConfigs(tree_sizing=TreeSizingConfig(cost="off")), PipelineConfig(transport="local", workers=2))
    try:
        accepted = False
        for prompt in ["Name two rivers.", "List three prime numbers and add them."]:
            ids = e.encode_chat(prompt)
            ar = [t for s in e.steps(ids, "ar", 40) for t in s.tokens]
            for mode in ("pld", "ht", "token-recycling"):
                steps = list(e.steps(ids, mode, 40))
                assert [t for s in steps for t in s.tokens] == ar, (prompt, mode)
                accepted |= any(len(s.tokens) > 1 for s in steps)
        assert accepted  # drafts were accepted: rows verified together were used
    finally:
        e.close()


QWEN_GGUF = cache_dir() / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


@pytest.mark.skipif(not QWEN_GGUF.is_file(), reason=f"{QWEN_GGUF} is not here")
def test_a_q4_k_m_file_ships_its_weights():
    """Qwen2.5-Coder-0.5B's Q4_K_M file is mostly Q5_0 (896 inputs are no multiple of a K
    block's 256), with Q8_0 v projections (in half the layers) and LM head and Q4_K / Q6_K
    down projections: every weight ships but the q/k/v fusions of Q5_0 and Q8_0 rows
    (rows of two formats do not concatenate), which stay float; all of them are
    transformers' de-quantized weights bit for bit."""
    float_model, _ = load_model(str(QWEN_GGUF), torch.float32, "cpu")
    shipped, left = read_shipped(QWEN_GGUF, float_model.args.n_layers, float_model.args.tie_embeddings)
    assert {format_of(b) for b in shipped.values()} == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"} and "lm_head.weight" in shipped
    assert left and all(name.endswith("qkv_proj.weight") for name in left)
    params = dict(float_model.named_parameters()) | {"lm_head.weight": float_model.lm_head.weight}
    for name, blocks in shipped.items():
        assert torch.equal(dequantize(blocks), params[name]), name
    model, _ = load_model(str(QWEN_GGUF), torch.float32, "cpu", weights="shipped")
    tokens = torch.tensor([[151644, 872, 198, 7985, 264, 729, 13, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        got = model(tokens, model.context(torch.arange(12)))
        want = float_model(tokens, float_model.context(torch.arange(12)))
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)

"""Our Transformer against transformers' reference implementation, and checkpoint loading errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import TINY_KINDS
from safetensors.torch import load_file, save_file

from runtime.decoding.autoregressive import decode_one, prefill
from workers.loading import ModelLoadError, load_model
from workers.model import DecoderLayer

ATOL = 1e-4
# The real model's 30 layers in float32: the native kernels sum dot products in another
# order than PyTorch's and transformers' kernels, which moves logits of magnitude ~20 by
# up to ~1.3e-4 (rounding, not a different computation: the tiny models stay within ATOL).
ATOL_REAL = 5e-4
SEQ = 20  # longer than the mistral window (8) and the llama3 original context (32 / 8 = 4 per unit)


def random_tokens(vocab: int, n: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


@torch.inference_mode()
def our_full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1])
    return model(tokens, model.context(positions))


@torch.inference_mode()
def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf(tokens).logits


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("kind", list(TINY_KINDS))
def test_full_forward_matches_transformers(tiny_models, kind):
    ours, hf = tiny_models(kind)
    tokens = random_tokens(ours.args.vocab_size)
    expected = hf_logits(hf, tokens)
    got = our_full_logits(ours, tokens)
    assert got.shape == expected.shape == (1, SEQ, ours.args.vocab_size)
    assert got.dtype == torch.float32
    # The logits are far from constant, so matching them means something.
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(TINY_KINDS))
def test_prefill_then_decode_matches_transformers(tiny_models, kind):
    ours, hf = tiny_models(kind)
    tokens = random_tokens(ours.args.vocab_size, seed=1)
    expected = hf_logits(hf, tokens)[0]
    n_prompt = 11
    cache = ours.new_cache(32)
    with torch.inference_mode():
        last = prefill(ours, cache, tokens[0, :n_prompt].tolist())
        assert cache.length == n_prompt
        torch.testing.assert_close(last, expected[n_prompt - 1], atol=ATOL, rtol=0)
        for i in range(n_prompt, SEQ):
            logits = decode_one(ours, cache, int(tokens[0, i]))
            assert cache.length == i + 1
            torch.testing.assert_close(logits, expected[i], atol=ATOL, rtol=0, msg=f"position {i}")


def test_prefill_in_chunks_matches_one_prefill(tiny_models):
    """Two prefill calls (a prompt extended later) equal one prefill of the whole prompt."""
    ours, hf = tiny_models("mistral_window")
    tokens = random_tokens(ours.args.vocab_size, seed=2)[0].tolist()
    expected = hf_logits(hf, torch.tensor([tokens]))[0]
    cache = ours.new_cache(32)
    with torch.inference_mode():
        prefill(ours, cache, tokens[:6])
        last = prefill(ours, cache, tokens[6:])
    assert cache.length == SEQ
    torch.testing.assert_close(last, expected[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama_rope_llama3", "llama_rope_linear"])
def test_rope_scaling_is_applied(tiny_models, kind):
    """The comparison above can fail: the unscaled rotary frequencies give other logits."""
    ours, hf = tiny_models(kind)
    tokens = random_tokens(ours.args.vocab_size)
    expected = hf_logits(hf, tokens)
    head_dim = ours.args.head_dim
    plain = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert not torch.allclose(ours.inv_freq, plain), "rope scaling left the frequencies unchanged"
    scaled = ours.inv_freq
    try:
        ours.inv_freq = plain
        wrong = our_full_logits(ours, tokens)
    finally:
        ours.inv_freq = scaled
    assert (wrong - expected).abs().max() > 100 * ATOL


def test_sliding_window_is_applied(tiny_models):
    """Without the window, mistral's logits agree before position 8 and differ after it."""
    ours, hf = tiny_models("mistral_window")
    assert ours.args.sliding_window == 8
    tokens = random_tokens(ours.args.vocab_size)
    expected = hf_logits(hf, tokens)[0]
    args = ours.args
    try:
        ours.args = dataclasses.replace(args, sliding_window=None)
        unwindowed = our_full_logits(ours, tokens)[0]
    finally:
        ours.args = args
    torch.testing.assert_close(unwindowed[:8], expected[:8], atol=ATOL, rtol=0)
    assert (unwindowed[8:] - expected[8:]).abs().amax(-1).min() > 100 * ATOL


def test_loaded_args(tiny_models):
    assert tiny_models("qwen2")[0].args.qkv_bias and not tiny_models("qwen2")[0].args.o_bias
    bias = tiny_models("llama_bias")[0].args
    assert bias.qkv_bias and bias.o_bias and bias.mlp_bias
    tied = tiny_models("llama_tied")[0]
    assert tied.args.tie_embeddings
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    assert tiny_models("qwen2")[0].args.sliding_window is None
    assert tiny_models("qwen2")[0].args.n_layers == 3


# --------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_matches_transformers(real_model, real_hf_model, chat_prompt_ids):
    model, tokenizer, _ = real_model
    tokens = torch.tensor([chat_prompt_ids])
    expected = hf_logits(real_hf_model, tokens)
    got = our_full_logits(model, tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL_REAL, rtol=0)


@pytest.mark.real_model
def test_real_model_prefill_decode_matches_transformers(real_model, real_hf_model, chat_prompt_ids):
    model, _, _ = real_model
    n_new = 6
    cache = model.new_cache(len(chat_prompt_ids) + n_new + 1)
    got = []
    with torch.inference_mode():
        logits = prefill(model, cache, chat_prompt_ids)
        generated = []
        for _ in range(n_new):
            got.append(logits)
            generated.append(int(logits.argmax()))
            logits = decode_one(model, cache, generated[-1])
    expected = hf_logits(real_hf_model, torch.tensor([chat_prompt_ids + generated]))[0]
    offset = len(chat_prompt_ids) - 1
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, expected[offset + i], atol=ATOL_REAL, rtol=0, msg=f"new token {i}")


@pytest.mark.real_model
def test_bfloat16_load(real_model, chat_prompt_ids):
    model32, _, _ = real_model
    model16, _ = load_model("default", torch.bfloat16, "cpu")
    assert model16.dtype == torch.bfloat16
    assert model16.inv_freq.dtype == torch.float32  # rotary angles stay float32
    tokens = torch.tensor([chat_prompt_ids])
    logits16 = our_full_logits(model16, tokens)[0]
    logits32 = our_full_logits(model32, tokens)[0]
    # The native kernels hand back the LM head's float32 sums (workers.model.LogitsHead):
    # the bfloat16 logits rounded, minus the ties that rounding makes.
    assert logits16.dtype == (torch.float32 if model16.kernels.name == "native" else torch.bfloat16)
    assert torch.isfinite(logits16.float()).all()
    agree = (logits16.float().argmax(-1) == logits32.argmax(-1)).float().mean().item()
    assert agree >= 0.8, f"bfloat16 and float32 argmax agree on only {agree:.0%} of positions"
    # Close in value too, at bfloat16 precision.
    assert (logits16.float() - logits32).abs().mean() < 0.5


# --------------------------------------------------------------------------- load errors


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="gpt2") as e:
        load_model(str(tmp_path))
    assert "llama" in str(e.value)  # names the supported ones


def test_folder_without_config(tmp_path, tiny_checkpoint):
    shutil.copy(next(tiny_checkpoint("llama").glob("*.safetensors")), tmp_path)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_folder_without_safetensors(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint("llama") / "config.json", tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_text_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(path))


def test_garbage_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(path))


def _rewrite_weights(src, dst, edit) -> None:
    """Copy checkpoint folder src to dst with edit(state) applied to its weights."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst)
    (shard,) = src.glob("*.safetensors")
    state = load_file(shard)
    edit(state)
    save_file(state, dst / shard.name, metadata={"format": "pt"})


def test_copy_of_checkpoint_loads(tmp_path, tiny_checkpoint):
    """Control for the mismatch tests below: an unedited copy loads."""
    _rewrite_weights(tiny_checkpoint("llama"), tmp_path, lambda state: None)
    model, folder = load_model(str(tmp_path))
    assert folder == tmp_path and model.args.n_layers == 2


def test_missing_tensor(tmp_path, tiny_checkpoint):
    _rewrite_weights(tiny_checkpoint("llama"), tmp_path, lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match="layers.1.mlp.down_proj.weight"):
        load_model(str(tmp_path))


def test_missing_part_of_fused_projection(tmp_path, tiny_checkpoint):
    _rewrite_weights(tiny_checkpoint("llama"), tmp_path, lambda s: s.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model(str(tmp_path))


def test_unexpected_tensor(tmp_path, tiny_checkpoint):
    def edit(state):
        state["model.layers.0.extra.weight"] = torch.zeros(3)

    _rewrite_weights(tiny_checkpoint("llama"), tmp_path, edit)
    with pytest.raises(ModelLoadError, match="extra.weight"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.norm.weight", (32,)),  # a plain tensor of the wrong size
        ("model.embed_tokens.weight", (160, 32)),
        ("model.layers.0.self_attn.k_proj.weight", (48, 64)),  # part of a fused projection
        ("model.layers.1.mlp.up_proj.weight", (128, 32)),  # fused, wrong input width
    ],
)
def test_wrong_shape(tmp_path, tiny_checkpoint, name, shape):
    def edit(state):
        assert state[name].shape != shape
        state[name] = torch.zeros(shape)

    _rewrite_weights(tiny_checkpoint("llama"), tmp_path, edit)
    with pytest.raises(ModelLoadError, match="shape|do not match"):
        load_model(str(tmp_path))


def test_config_with_different_architecture_than_weights(tmp_path, tiny_checkpoint):
    """A qwen2 config over llama weights: qwen2 expects q/k/v biases that are not there."""
    _rewrite_weights(tiny_checkpoint("llama"), tmp_path, lambda s: None)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "qwen2"
    config["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="qkv_proj.bias"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- kernels


@pytest.mark.real_model
def test_native_and_torch_kernels_agree(real_model, chat_prompt_ids):
    model, _, _ = real_model
    tokens = torch.tensor([chat_prompt_ids])
    assert model.kernels.name == "native"  # auto, on an AVX2 CPU
    native = our_full_logits(model, tokens)
    try:
        assert model.use_kernels("torch").name == "torch"
        reference = our_full_logits(model, tokens)
    finally:
        model.use_kernels("native")
    torch.testing.assert_close(native, reference, atol=ATOL_REAL, rtol=0)
    assert torch.equal(our_full_logits(model, tokens), native)  # switching back changes nothing


@pytest.mark.real_model
def test_bfloat16_native_prefill_equals_token_by_token(chat_prompt_ids):
    """Row independence end to end: every row of a many-row forward (prefill, tree step) gets
    bit-identical logits to a one-row step, so bfloat16 tree decoding cannot flip a token."""
    model16, _ = load_model("default", torch.bfloat16, "cpu", "native")
    ids = chat_prompt_ids[:40]
    together = our_full_logits(model16, torch.tensor([ids]))[0]
    cache = model16.new_cache(64)
    with torch.inference_mode():
        for i, t in enumerate(ids):
            logits = model16(torch.tensor([[t]]), model16.context(torch.tensor([i]), cache))[0, 0]
            cache.commit(1)
            assert torch.equal(logits, together[i]), f"position {i}"


def test_the_native_lm_head_returns_float32_sums_that_round_to_the_bfloat16_logits():
    model16, _ = load_model("default", torch.bfloat16, "cpu", "native")
    x = torch.randn(1, 5, model16.args.dim).to(torch.bfloat16)
    with torch.inference_mode():
        logits = model16.lm_head(x)
        rounded = model16.kernels.linear(x, model16.lm_head.weight, None)  # the plain linear: bfloat16 out
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(logits.to(torch.bfloat16), rounded)
    ties = lambda t: (t.topk(2, dim=-1).values.diff(dim=-1) == 0).sum().item()  # noqa: E731
    assert ties(logits) <= ties(rounded.float())


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "qwen2", "mistral_window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_layer_equals_the_layer_op_by_op(tiny_checkpoint, monkeypatch, kind, dtype):
    """The native kernels run a decoder layer in one call (DecoderLayer.fused): the logits
    and the cache it writes are bit-identical to the op-by-op layer's, for a one-row step and
    a tree step, past the sliding window; prompt rows stay op by op."""
    model, _ = load_model(str(tiny_checkpoint(kind)), dtype, "cpu", "native")
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    fused_calls = []
    original = DecoderLayer.fused

    def spy(self, h, ctx):
        out = original(self, h, ctx)
        fused_calls.append(out is not None)
        return out

    @torch.inference_mode()
    def run():
        cache = model.new_cache(32)
        prompt = random_tokens(model.args.vocab_size, 11)
        model(prompt, model.context(torch.arange(11), cache, prompt_rows=10))
        cache.commit(11)
        one = model(random_tokens(model.args.vocab_size, 1, seed=1), model.context(torch.tensor([11]), cache))
        cache.commit(1)
        positions = torch.tensor([12, 13, 13, 14])
        step = model(random_tokens(model.args.vocab_size, 4, seed=2), model.context(positions, cache, tree))
        return one, step, cache.k.clone(), cache.v.clone()

    monkeypatch.setattr(DecoderLayer, "fused", spy)
    fused = run()
    layers = model.args.n_layers
    assert fused_calls == [False] * layers + [True] * 2 * layers  # the prompt op by op, then the steps fused
    monkeypatch.setattr(DecoderLayer, "fused", lambda self, h, ctx: None)
    op_by_op = run()
    for a, b in zip(fused, op_by_op):
        assert torch.equal(a, b)

"""Shared fixtures: tiny random Hugging Face checkpoints and the real default model.

The machine is small and shared, so every test runs on one CPU thread, the tiny models
have 64-wide hidden states, and the real model (SmolLM2-135M, float32) is loaded once
per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

THREADS = 1
torch.set_num_threads(THREADS)

# The tiny checkpoints: hidden 64, 4 heads of 16, 2 kv heads (GQA), vocab 160.
TINY_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # Larger than the default 0.02 so that logits and attention patterns are far from
    # uniform: a wrong rotary angle or a wrong mask then moves the logits by far more
    # than the 1e-4 tolerance of the comparisons.
    initializer_range=0.1,
)

TINY_KINDS = {
    "llama": ("llama", {}),
    "llama_rope_llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama_rope_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {"num_hidden_layers": 3}),
    # A draft model for "qwen2" (workers.drafters.draft_model): the same vocabulary, narrower and shallower.
    "qwen2_draft": ("qwen2", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 1}),
    "qwen2_other_vocab": ("qwen2", {"num_hidden_layers": 1, "vocab_size": 192}),  # cannot draft for "qwen2"
    "mistral_window": ("mistral", {"sliding_window": 8}),
}


def _config(arch: str, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    kwargs = {**TINY_BASE, **overrides}
    kwargs.setdefault("tie_word_embeddings", False)
    return cls(**kwargs)


def _nonzero_biases(model: torch.nn.Module) -> None:
    """Random init leaves biases at zero, which would hide a bias that is loaded wrong."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(kind) -> folder of a random HF checkpoint (built once per kind)."""
    from transformers import AutoModelForCausalLM

    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in built:
            arch, overrides = TINY_KINDS[kind]
            config = _config(arch, overrides)
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            _nonzero_biases(model)
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            model.save_pretrained(folder, safe_serialization=True)
            assert list(folder.glob("*.safetensors")), "save_pretrained wrote no safetensors"
            built[kind] = folder
        return built[kind]

    return make


def load_hf(folder: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model for a checkpoint folder: the reference implementation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoint):
    """Factory: tiny_models(kind) -> (our float32 model, transformers' model), loaded once per kind."""
    from workers.loading import load_model

    loaded: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in loaded:
            folder = tiny_checkpoint(kind)
            ours, _ = load_model(str(folder), torch.float32, "cpu")
            loaded[kind] = (ours, load_hf(folder))
        return loaded[kind]

    return get


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer, folder) for the packaged SmolLM2-135M-Instruct, float32 on the CPU."""
    from workers.loading import load_model, load_tokenizer

    model, folder = load_model("default", torch.float32, "cpu")
    return model, load_tokenizer(folder), folder


@pytest.fixture(scope="session")
def real_hf_model(real_model):
    """transformers' model of the same checkpoint, float32."""
    _, _, folder = real_model
    return load_hf(folder)


@pytest.fixture(scope="session")
def chat_prompt_ids(real_model):
    _, tokenizer, _ = real_model
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


@pytest.fixture(autouse=True)
def _one_thread():
    """The CLI sets torch's thread count from its config; put it back after every test."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the packaged SmolLM2-135M checkpoint (runs by default)")

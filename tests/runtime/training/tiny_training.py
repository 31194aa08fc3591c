"""The training tests' tiny model and its data, as fixtures their modules import: a random
Llama (hidden 64, 4 layers) and token sequences it generated greedily itself. (Not a
conftest.py: tests/workers/test_model.py imports the root one by its module name.)"""

from __future__ import annotations

import pytest
import torch

from runtime.decoding.autoregressive import generate_ar
from workers.loading import load_model

from conftest import TINY_BASE

VOCAB = 128
REPLY = 24


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    # The shared tiny shape (conftest.TINY_BASE), deeper, with a vocabulary of its own and
    # peaked enough that the drafting task is not trivial.
    config = LlamaConfig(**{**TINY_BASE, "num_hidden_layers": 4, "vocab_size": VOCAB, "initializer_range": 0.15,
                            "tie_word_embeddings": False})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-ht")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny_folder):
    return load_model(str(tiny_folder), torch.float32, "cpu")[0]


@pytest.fixture(scope="module")
def examples(model):
    """130 sequences (120 train, 10 val): random prompts of 6-14 tokens, the tiny model's greedy replies of 24."""
    g = torch.Generator().manual_seed(7)
    cache = model.new_cache(64)
    out = []
    for i in range(130):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(6, 15, (1,), generator=g)),), generator=g).tolist()
        reply = [t for s in generate_ar(model, cache, prompt, REPLY, set()) for t in s.tokens]
        out.append({"id": f"syn{i}", "prompt_ids": prompt, "reply_ids": reply})
    return out[:120], out[120:]

"""The real model in float32 and bfloat16, and caches prefilled with prompts of different
lengths: what the tests of shared passes (workers.batched_step, runtime.batching) start from."""

import pytest
import torch

from runtime.decoding.autoregressive import prefill
from workers.loading import load_model
from workers.tree_step import decoding_cache

PROMPTS = [[1, 9, 400, 33], [7, 7, 7, 7, 7, 7, 7, 7, 7, 12], [2, 5000]]  # different lengths: different positions


@pytest.fixture(scope="module", params=["float32", "bfloat16", "bfloat16-shipped"])
def model(request):
    """The model in each dtype; bfloat16-shipped: its linear layers on the GGUF file's own
    blocks (weights = "shipped"), whose products take the same fused and ragged layers."""
    dtype, _, weights = request.param.partition("-")
    model, _ = load_model("default", getattr(torch, dtype), "cpu", weights=weights or "float")
    return model


def prefilled(model, prompts):
    caches = [decoding_cache(model, 64) for _ in prompts]
    with torch.inference_mode():
        for cache, ids in zip(caches, prompts):
            prefill(model, cache, ids)
    return caches

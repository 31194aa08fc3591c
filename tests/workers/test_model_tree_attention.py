"""The model's tree attention (workers.model with a workers.tree ancestor mask): one forward
over a token tree equals sequential decoding of every branch."""

from __future__ import annotations

import pytest
import torch

from runtime.decoding.autoregressive import decode_one, prefill
from workers.tree import TokenTree

ATOL = 1e-4
# The real model's logits reach ~30 after 30 layers, where float32 summation order alone
# moves them by ~1e-4: a causal forward of a whole path already differs from decoding it
# token by token by up to 1.1e-4 (measured). So its comparisons also allow 1e-5 relative,
# i.e. <= 4e-4 on the largest logits; a wrong mask or position moves them by > 1e-1.
REAL_RTOL = 1e-5

#            0
#          /   \
#         1     2
#        / \     \
#       3   4     5
#       |   |     |
#       6   7     8
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 4, 5]  # topological: every parent comes before its children
LEAVES = [6, 7, 8]


TREE = TokenTree.from_parents([0] * len(PARENTS), PARENTS)  # the shape; tokens come from tree_tokens


def tree_tokens(vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (len(PARENTS),), generator=g).tolist()


@torch.inference_mode()
def tree_forward(model, prefix: list[int], tokens: list[int]):
    """Prefill the prefix, then run the whole tree in one forward pass; returns (logits (n, vocab), cache)."""
    cache = model.new_cache(len(prefix) + len(tokens) + 4)
    prefill(model, cache, prefix)
    positions = torch.tensor([len(prefix) + d for d in TREE.depths])
    ctx = model.context(positions, cache, tree_mask=TREE.ancestor_mask())
    assert ctx.mask is not None and ctx.mask.shape == (len(tokens), len(prefix) + len(tokens))
    logits = model(torch.tensor([tokens]), ctx)[0]
    assert cache.length == len(prefix), "a tree forward must leave its positions pending"
    return logits, cache


@torch.inference_mode()
def sequential(model, prefix: list[int], path_tokens: list[int]) -> list[torch.Tensor]:
    """Logits after each token of path_tokens, decoded one by one on a fresh cache."""
    cache = model.new_cache(len(prefix) + len(path_tokens) + 4)
    prefill(model, cache, prefix)
    return [decode_one(model, cache, t) for t in path_tokens]


def check_tree_matches_sequential(model, prefix: list[int], tokens: list[int], rtol: float = 0.0) -> None:
    logits, _ = tree_forward(model, prefix, tokens)
    for node in range(len(PARENTS)):
        path = TREE.path_to(node)
        expected = sequential(model, prefix, [tokens[i] for i in path])[-1]
        torch.testing.assert_close(logits[node], expected, atol=ATOL, rtol=rtol, msg=f"node {node} (path {path})")


def check_keep_then_decode(
    model, prefix: list[int], tokens: list[int], leaf: int, next_token: int, rtol: float = 0.0
) -> None:
    path = TREE.path_to(leaf)
    tree_logits, cache = tree_forward(model, prefix, tokens)
    with torch.inference_mode():
        cache.keep(path)
        assert cache.length == len(prefix) + len(path)
        got = decode_one(model, cache, next_token)
    expected = sequential(model, prefix, [tokens[i] for i in path] + [next_token])
    torch.testing.assert_close(tree_logits[leaf], expected[-2], atol=ATOL, rtol=rtol)
    torch.testing.assert_close(got, expected[-1], atol=ATOL, rtol=rtol)


TINY = ["llama", "qwen2", "mistral_window"]


def tiny_prefix(vocab: int, n: int = 12) -> list[int]:
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("kind", TINY)
def test_tree_forward_matches_sequential(tiny_models, kind):
    model, _ = tiny_models(kind)
    vocab = model.args.vocab_size
    # With the mistral window of 8 after a 12-token prefix, deep nodes see only part of the prefix.
    check_tree_matches_sequential(model, tiny_prefix(vocab), tree_tokens(vocab))


@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("leaf", LEAVES)
def test_keep_path_then_decode(tiny_models, kind, leaf):
    model, _ = tiny_models(kind)
    vocab = model.args.vocab_size
    check_keep_then_decode(model, tiny_prefix(vocab), tree_tokens(vocab), leaf, next_token=7)


def test_tree_mask_matters(tiny_models):
    """Control: with a causal mask instead of the tree mask, nodes off the first branch differ."""
    model, _ = tiny_models("llama")
    vocab = model.args.vocab_size
    prefix, tokens = tiny_prefix(vocab), tree_tokens(vocab)
    cache = model.new_cache(32)
    with torch.inference_mode():
        prefill(model, cache, prefix)
        positions = torch.tensor([len(prefix) + d for d in TREE.depths])
        causal = model(torch.tensor([tokens]), model.context(positions, cache))[0]
    expected = sequential(model, prefix, [tokens[i] for i in TREE.path_to(5)])[-1]
    assert (causal[5] - expected).abs().max() > 100 * ATOL


@pytest.mark.real_model
def test_real_model_tree(real_model, chat_prompt_ids):
    model, tokenizer, _ = real_model
    # Plausible continuations of the chat prompt, laid out on the tree.
    words = tokenizer.encode(" The sky is blue because of Rayleigh scattering of sunlight")
    tokens = (words * 2)[: len(PARENTS)]
    check_tree_matches_sequential(model, chat_prompt_ids, tokens, rtol=REAL_RTOL)


@pytest.mark.real_model
def test_real_model_keep_then_decode(real_model, chat_prompt_ids):
    model, tokenizer, _ = real_model
    words = tokenizer.encode(" The sky is blue because of Rayleigh scattering of sunlight")
    tokens = (words * 2)[: len(PARENTS)]
    check_keep_then_decode(model, chat_prompt_ids, tokens, leaf=8, next_token=words[0], rtol=REAL_RTOL)

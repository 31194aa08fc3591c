"""The drafter worker's growing draft tree (workers.drafters.draft_tree) on a tiny random
Qwen2 draft model: after every grow and advance (down the tree, off it, onto another
history) the committed rows equal a fresh run over the committed tokens, and every node's
score is its path's log-probability in a cache-free run; width 1 is the greedy chain; a
commit down the tree keeps the subtree below it; the rows stop at max_rows."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from workers.drafters.draft_tree import GrowingDraftTree
from workers.tree_step import decoding_cache

PROMPT = [5, 9, 2, 7, 11, 3]


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("qwen2_draft")[0]


@pytest.fixture(scope="module")
def peaked(model):
    """The model with sharper next-token distributions: a good child can outscore its
    parent's siblings, so nodes are not expanded in the order they were made."""
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(40.0)
    return sharp


def logprobs_after(model, tokens: list[int]) -> torch.Tensor:
    """The log-probabilities after `tokens`, from a cache-free run."""
    with torch.inference_mode():
        cache = model.new_cache(len(tokens))
        h = model.run_layers(model.embed(torch.tensor([tokens])), model.context(torch.arange(len(tokens)), cache))
        return torch.log_softmax(model.lm_head(model.norm(h[0, -1])).float(), -1)


def check(tree: GrowingDraftTree) -> None:
    model, cache = tree.model, tree.cache
    n = tree.base
    assert n <= len(tree.committed) and cache.length == n + sum(tree.expanded[1:])
    if n:
        fresh = model.new_cache(n)
        with torch.inference_mode():
            model(torch.tensor([tree.committed[:n]]), model.context(torch.arange(n), fresh))
        torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], atol=1e-5, rtol=1e-5)
    for node in range(1, len(tree.tokens)):
        path, x = [], node
        while x > 0:
            path.append(tree.tokens[x])
            x = tree.parents[x]
        path = path[::-1]
        parent_lp = logprobs_after(model, tree.committed + path[:-1])
        assert tree.scores[node] == pytest.approx(tree.scores[tree.parents[node]] + float(parent_lp[path[-1]]), abs=1e-4)


def test_width_one_grows_the_greedy_chain(model):
    tree = GrowingDraftTree(model, decoding_cache(model, 128), 1, 64)
    tree.advance(0, PROMPT)
    assert tree.grow(5) == 5
    drafted = tree.tree()
    chain, seq = drafted.tokens[1:], list(PROMPT)
    for token in chain:
        assert token == int(logprobs_after(model, seq).argmax())
        seq.append(token)
    check(tree)


def test_commits_down_the_tree_keep_what_was_drafted_below(model):
    tree = GrowingDraftTree(model, decoding_cache(model, 128), 2, 64)
    tree.advance(0, PROMPT)
    tree.grow(4)
    check(tree)
    drafted = tree.tree()
    leaf = max(range(len(drafted)), key=lambda i: drafted.depths[i])
    path = [drafted.tokens[i] for i in drafted.path_to(leaf)[1:]]
    assert len(path) >= 3
    second = tree.child(tree.child(0, path[0]), path[1])
    below = [x for x in range(len(tree.tokens)) if tree._descends(x, second)]
    tree.advance(len(tree.committed), path[:2])  # the outcome the tree drafted for
    assert tree.committed == PROMPT + path[:2] and tree.tokens[0] == path[1]
    assert len(tree.tokens) == len(below) > 1  # the subtree below survived whole
    check(tree)
    tree.grow(2)
    check(tree)


def test_a_subtree_expanded_out_of_order_is_kept_exactly(peaked):
    """Best first, a node made early can be expanded after nodes made later: the rows kept
    below a new root are moved in expansion order, not node order."""
    tree = GrowingDraftTree(peaked, decoding_cache(peaked, 256), 2, 64)
    tree.advance(0, PROMPT)
    tree.grow(30)

    def out_of_order(top: int) -> bool:
        rows = [tree.rows[x] for x in range(top + 1, len(tree.tokens)) if tree.expanded[x] and tree._descends(x, top)]
        return rows != sorted(rows)

    top = next(c for c in range(1, len(tree.tokens)) if tree.expanded[c] and out_of_order(c))
    below = sum(tree._descends(x, top) for x in range(len(tree.tokens)))
    path, node = [], top
    while node > 0:
        path.insert(0, tree.tokens[node])
        node = tree.parents[node]
    tree.advance(len(tree.committed), path)
    assert len(tree.tokens) == below
    check(tree)
    tree.grow(3)
    check(tree)


def test_commits_off_the_tree_and_other_histories_start_again(model):
    tree = GrowingDraftTree(model, decoding_cache(model, 128), 2, 64)
    tree.advance(0, PROMPT)
    tree.grow(3)
    off = next(t for t in range(1, 50) if tree.child(0, t) is None)
    tree.advance(len(tree.committed), [off, 4])
    assert len(tree.tokens) == 1 and tree.committed == PROMPT + [off, 4]
    tree.grow(2)
    check(tree)
    tree.advance(3, [8])  # a new reply sharing 3 tokens
    assert tree.committed == PROMPT[:3] + [8] and tree.base <= 3
    tree.grow(2)
    check(tree)
    tree.advance(2, [])  # a prefix of what it holds: the root is fed again
    assert tree.committed == PROMPT[:2] and tree.base == 1
    assert tree.grow(1) == 1 and tree.base == 2
    check(tree)


@pytest.mark.parametrize("width,max_rows,seed,sharp", [(2, 12, 3, False), (3, 40, 5, True), (2, 30, 7, True)])
def test_random_commits_keep_the_cache_exact(model, peaked, width, max_rows, seed, sharp):
    """Nodes are expanded best first, not in the order they were made: the rows kept below
    a new root are moved in expansion order."""
    rng = random.Random(seed)
    m = peaked if sharp else model
    tree = GrowingDraftTree(m, decoding_cache(m, 512), width, max_rows)
    tree.advance(0, PROMPT)
    for _ in range(25):
        tree.grow(rng.randint(1, 3))
        check(tree)
        inner = [i for i in range(1, len(tree.tokens)) if tree.expanded[i]]
        if inner and rng.random() < 0.6:  # an outcome the tree drafted below: its subtree stays
            node, path = rng.choice(inner), []
            while node > 0:
                path.insert(0, tree.tokens[node])
                node = tree.parents[node]
        else:  # off the tree somewhere
            drafted = tree.tree()
            path = [drafted.tokens[i] for i in drafted.path_to(rng.randrange(len(drafted)))[1:]] + [rng.randrange(1, 60)]
        tree.advance(len(tree.committed), path)
        check(tree)
    assert tree.tree_rows <= max_rows


def test_rows_stop_at_max_rows(model):
    tree = GrowingDraftTree(model, decoding_cache(model, 128), 2, 5)
    tree.advance(0, PROMPT)
    tree.grow(10)
    assert tree.tree_rows == 5 and tree.grow(3) == 0
    with pytest.raises(ValueError, match="cannot be kept"):
        tree.advance(len(tree.committed) + 1, [1])

"""Token recycling (workers.drafters.token_recycling): the tree it grows from its adjacency table."""

import pytest
import torch

from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.tree import DEFAULT_TEMPLATE


def test_token_recycling_tree_follows_the_adjacency_table():
    d = TokenRecyclingDrafter(vocab_size=50, top_k=5, budget=8)
    assert d.propose(3).tokens == [3]  # empty table: root only
    tree = d.propose(3)
    top = torch.tensor([[10, 11, 12, 13, 14]])
    d.observe(tree, [0], top)  # after token 3 the target likes 10, 11, 12, ...
    d.adjacency[10] = torch.tensor([20, 21, 22, 23, 24])
    tree = d.propose(3)
    # DEFAULT_TEMPLATE[:7] = (0,), (0,0), (1,), (0,0,0), (0,1), (2,), (1,0); nothing known after 20 or 11.
    expected = {(0,): 10, (1,): 11, (2,): 12, (0, 0): 20, (0, 1): 21}
    assert sorted(tree.tokens[1:]) == sorted(expected.values())
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        assert parent < node and tree.depths[node] == tree.depths[parent] + 1
    assert len(tree) <= 8


def test_token_recycling_rejects_a_too_small_top_k():
    with pytest.raises(ValueError, match="top_k"):
        TokenRecyclingDrafter(vocab_size=50, top_k=3, budget=8, template=DEFAULT_TEMPLATE)

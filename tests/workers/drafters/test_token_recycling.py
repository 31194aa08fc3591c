"""Token recycling (workers.drafters.token_recycling): the tree it grows from its adjacency table."""

import pytest
import torch

from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.tree import DEFAULT_TEMPLATE, TokenTree


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


def test_successors_are_grafted_under_every_node_by_its_own_token():
    """Under each node, the table's best and second-best successor of that node's token,
    and the best successor of the best: drafts that depend on the parent's token."""
    d = TokenRecyclingDrafter(vocab_size=50, top_k=5, budget=8)
    d.adjacency[3] = torch.tensor([10, 11, 12, 13, 14])
    d.adjacency[10] = torch.tensor([20, 21, 22, 23, 24])
    d.adjacency[7] = torch.tensor([30, -1, -1, -1, -1])  # one successor known after 7
    tree = TokenTree([3, 7, 10], [-1, 0, 0], [0, 1, 1], [0.0, -0.5, -1.0])  # a drafter's tree: root 3, children 7, 10
    slots = d.graft_successors(tree, [0, 1])
    # Under the root: 10 (already there: it keeps its score and gets the slot), 11, and 10 -> 20.
    assert tree.walk([10]) == 2 and tree.scores[2] == -1.0 and slots[2] == ("recycled", (0,))
    assert slots[tree.walk([11])] == ("recycled", (1,)) and slots[tree.walk([10, 20])] == ("recycled", (0, 0))
    # Under node 7: only 30; its second successor and 30's are unknown.
    assert slots[tree.walk([7, 30])] == ("recycled", (0,)) and tree.walk([7, 30, 0]) is None
    assert len(tree) == 6 and len(slots) == 4
    for node in range(3, len(tree)):
        assert tree.scores[node] == float("-inf")  # no draft probability: rated by slot
        assert tree.depths[node] == tree.depths[tree.parents[node]] + 1
    assert d.graft_successors(TokenTree([4], [-1], [0], [0.0]), [0]) == {}  # nothing known after 4

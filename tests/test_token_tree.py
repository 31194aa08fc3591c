"""Token-tree construction, masks and greedy acceptance on hand-built inputs."""

import math

import pytest
import torch

from runtime.ht_decoding import next_drafts, pseudo_mask
from runtime.sampling import Greedy
from runtime.tree_decoding import accept
from workers.tree import TokenTree, build_dynamic_tree, build_template_tree, root_only


def logprobs(rows):
    """rows: per depth, {token: prob}; the rest of a 10-token vocab shares what is left."""
    out = torch.full((len(rows), 10), 1e-9)
    for d, row in enumerate(rows):
        for tok, p in row.items():
            out[d, tok] = p
    return out.log()


def brute_force_best(lp, budget, top_k):
    """Scores of the `budget` best nodes by exhaustive enumeration of all paths."""
    cands = [torch.topk(lp[d], top_k) for d in range(lp.shape[0])]
    scores = []

    def walk(depth, score):
        if depth == lp.shape[0]:
            return
        for v in cands[depth].values.tolist():
            scores.append(score + v)
            walk(depth + 1, score + v)

    walk(0, 0.0)
    return sorted(scores, reverse=True)[: budget - 1]


def test_dynamic_tree_keeps_the_best_paths_and_is_a_valid_tree():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 10) * 2, dim=-1)
    tree = build_dynamic_tree(7, lp, budget=12, top_k=4)
    assert len(tree) == 12 and tree.tokens[0] == 7 and tree.parents[0] == -1
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        assert 0 <= parent < node  # topological order
        assert tree.depths[node] == tree.depths[parent] + 1
        assert math.isclose(tree.scores[node], tree.scores[parent] + lp[tree.depths[node] - 1, tree.tokens[node]].item(), abs_tol=1e-5)
    assert sorted(tree.scores[1:], reverse=True) == pytest.approx(brute_force_best(lp, 12, 4), abs=1e-5)
    siblings = {}
    for node in range(1, len(tree)):
        siblings.setdefault(tree.parents[node], []).append(tree.tokens[node])
    assert all(len(set(v)) == len(v) for v in siblings.values())


def test_dynamic_tree_respects_depth_and_budget():
    lp = logprobs([{1: 0.9}, {2: 0.9}])
    tree = build_dynamic_tree(0, lp, budget=100, top_k=2)
    assert tree.max_depth == 2 and len(tree) == 1 + 2 + 4
    assert tree.tokens[1:3] == [1, 2]  # best chain first
    assert len(build_dynamic_tree(0, lp, budget=1, top_k=2)) == 1


def test_template_tree():
    lp = logprobs([{3: 0.6, 4: 0.3}, {5: 0.7, 6: 0.2}, {8: 0.5}])
    tree = build_template_tree(9, lp, [(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (1, 0, 0, 0)])
    assert tree.tokens == [9, 3, 4, 5, 6, 8]
    assert tree.parents == [-1, 0, 0, 1, 1, 3]
    with pytest.raises(ValueError):
        build_template_tree(9, lp, [(0, 0)])


def test_ancestor_mask():
    tree = TokenTree([0, 1, 2, 3, 4], [-1, 0, 0, 1, 3], [0, 1, 1, 2, 3], [0.0] * 5)
    mask = tree.ancestor_mask()
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    assert tree.path_to(4) == [0, 1, 3, 4]


def accept_greedy(tree, targets):
    """accept() with greedy choices whose argmax after node i is targets[i]; checks the
    committed tokens (path drafts + bonus) and returns the path."""
    logits = torch.nn.functional.one_hot(torch.tensor(targets), 128).float()
    path, tokens, margins = accept(tree, logits, Greedy(), 0)
    assert tokens == [tree.tokens[i] for i in path[1:]] + [targets[path[-1]]]
    assert margins == [1.0] * len(tokens)
    return path


def test_accept_greedy_on_hand_built_targets():
    #        0
    #      /   \
    #     1(a)  2(b)
    #     |      |
    #     3(c)   4(d)
    tree = TokenTree([100, 10, 11, 12, 13], [-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], [0.0] * 5)
    assert accept_greedy(tree, [11, 99, 13, 99, 50]) == [0, 2, 4]  # b then d, bonus 50
    assert accept_greedy(tree, [10, 12, 99, 77, 99]) == [0, 1, 3]
    assert accept_greedy(tree, [10, 55, 99, 99, 99]) == [0, 1]  # c rejected
    assert accept_greedy(tree, [42, 0, 0, 0, 0]) == [0]  # nothing accepted
    assert accept_greedy(root_only(5), [6]) == [0]


def test_pseudo_mask_layout():
    node_mask = TokenTree([0, 1, 2], [-1, 0, 0], [0, 1, 1], [0.0] * 3).ancestor_mask()
    m = pseudo_mask(node_mask, groups=[2], k=2, pseudo_attention=True)
    assert m.shape == (5, 5)
    assert torch.equal(m[:3, 3:], torch.zeros(3, 2, dtype=torch.bool))  # nodes never see pseudo states
    assert m[3].tolist() == [True, False, True, True, False]  # pseudo (2, 1): root, node 2, itself
    assert m[4].tolist() == [True, False, True, True, True]  # pseudo (2, 2) also sees pseudo (2, 1)
    off = pseudo_mask(node_mask, groups=[2], k=2, pseudo_attention=False)
    assert off[4].tolist() == [True, False, True, False, True]


def test_next_drafts_fall_back_to_the_deepest_drafted_ancestor():
    # A chain 0 -> 1 -> 2 -> 3; pseudo states (k = 3) for nodes 0 and 1 only.
    tree = TokenTree([100, 10, 11, 12], [-1, 0, 1, 2], [0, 1, 2, 3], [0.0, -1.0, -2.0, -3.0])
    drafts = torch.arange(2 * 3 * 5, dtype=torch.float).reshape(2, 3, 5)  # (groups, k, vocab)
    groups = [0, 1]
    assert torch.equal(next_drafts(tree, [0, 1], groups, drafts), drafts[1])  # own drafts
    assert torch.equal(next_drafts(tree, [0], groups, drafts), drafts[0])
    assert torch.equal(next_drafts(tree, [0, 1, 2], groups, drafts), drafts[1][1:])  # node 1's, one deeper
    assert torch.equal(next_drafts(tree, [0, 1, 2, 3], groups, drafts), drafts[1][2:])
    assert next_drafts(tree, [0, 1, 2, 3], [0], drafts[:1]) is None  # 3 beyond the root's k = 3


def test_every_prefix_of_the_default_template_is_a_valid_tree():
    from workers.tree import DEFAULT_TEMPLATE

    lp = torch.log_softmax(torch.randn(4, 50), dim=-1)
    for n in range(len(DEFAULT_TEMPLATE) + 1):
        tree = build_template_tree(7, lp, DEFAULT_TEMPLATE[:n])
        assert len(tree) == 1 + sum(len(p) <= 4 for p in DEFAULT_TEMPLATE[:n])
        assert all(tree.parents[i] < i for i in range(1, len(tree)))

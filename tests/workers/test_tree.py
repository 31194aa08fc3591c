"""Token trees (workers.tree): construction, masks, lookups and grafts on hand-built inputs."""

import math

import pytest
import torch

from workers.tree import TokenTree, build_dynamic_tree, chain, graft_chain, root_only


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


def test_ancestor_mask():
    tree = TokenTree([0, 1, 2, 3, 4], [-1, 0, 0, 1, 3], [0, 1, 1, 2, 3], [0.0] * 5)
    mask = tree.ancestor_mask()
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    assert tree.path_to(4) == [0, 1, 3, 4]


def test_graft_chain_reuses_matching_nodes_and_scores_new_ones():
    lp = torch.log_softmax(torch.randn(2, 20), dim=-1)
    tree = build_dynamic_tree(7, lp, budget=4, top_k=3)
    first = tree.tokens[1]  # the best depth-1 draft
    n = len(tree)
    graft_chain(tree, [first, 5, 6], lp)
    assert len(tree) <= n + 2  # `first` is reused; 5 (maybe) and 6 are new
    node = tree.tokens.index(6, n)
    assert tree.depths[node] == 3 and tree.scores[node] == float("-inf")  # deeper than the drafts
    path = tree.path_to(node)
    assert [tree.tokens[i] for i in path] == [7, first, 5, 6]
    assert tree.ancestor_mask()[node, path].all()
    lone = graft_chain(root_only(3), [4], None)
    assert lone.tokens == [3, 4] and lone.parents == [-1, 0]


#            0
#          /   \
#         1     2
#        / \     \
#       3   4     5
#       |   |     |
#       6   7     8
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 4, 5]


def test_from_parents_paths_and_ancestors():
    tree = TokenTree.from_parents(list(range(100, 109)), PARENTS)
    assert tree.depths == [0, 1, 1, 2, 2, 2, 3, 3, 3] and tree.scores == [0.0] * 9
    assert tree.path_to(8) == [0, 2, 5, 8] and tree.path_to(0) == [0]
    mask = tree.ancestor_mask()
    assert mask[7].nonzero().flatten().tolist() == [0, 1, 4, 7]
    assert mask.diagonal().all() and not mask.triu(1).any()
    assert mask.sum().item() == sum(d + 1 for d in tree.depths)
    assert tree.children()[1] == [3, 4] and tree.children()[6] == []
    for bad in ([0, 0, 1], [-1, 2, 0], [-1, 0]):
        with pytest.raises(ValueError, match="root first"):
            TokenTree.from_parents([1, 2, 3], bad)


def test_child_and_walk_follow_tokens():
    tree = TokenTree.from_parents([9, 5, 6, 7, 5], [-1, 0, 0, 1, 1])
    assert tree.child(0, 6) == 2 and tree.child(0, 7) is None and tree.child(1, 5) == 4
    assert tree.walk([5, 7]) == 3 and tree.walk([]) == 0 and tree.walk([6, 1]) is None
    assert tree.walk([5], node=1) == 4
    assert chain(9, [1, 2]).parents == [-1, 0, 1] and chain(9, []).tokens == root_only(9).tokens


def test_graft_chain_at_a_node_adds_unscored_nodes_below_it():
    tree = TokenTree.from_parents([9, 5, 6], [-1, 0, 0])
    graft_chain(tree, [6, 8, 3], None, at=2)  # 6 is not a child of node 2: all new
    assert tree.tokens[3:] == [6, 8, 3] and tree.parents[3:] == [2, 3, 4] and tree.depths[3:] == [2, 3, 4]
    assert tree.scores[3:] == [float("-inf")] * 3
    graft_chain(tree, [6, 8, 1], None, at=2)  # reuses 6 -> 8, adds 1
    assert len(tree) == 7 and tree.parents[6] == 4


def test_dynamic_tree_with_a_prior_gives_each_node_its_own_children():
    """Without a prior both depth-1 candidates get the same depth-2 child; with one, the
    child under each is the one its token is followed by in the counted text."""
    from workers.drafters.successor_prior import SuccessorPrior

    def best_child(tree):  # depth-1 token -> its first (best) child's token
        out = {}
        for n in range(len(tree)):
            if tree.depths[n] == 2:
                out.setdefault(tree.tokens[tree.parents[n]], tree.tokens[n])
        return out

    lp = logprobs([{1: 0.5, 2: 0.4}, {3: 0.3, 4: 0.28, 5: 0.27}])
    assert best_child(build_dynamic_tree(0, lp, budget=8, top_k=3)) == {1: 3, 2: 3}
    prior = SuccessorPrior.count([[1, 4], [1, 4], [2, 5], [2, 5], [0, 1], [0, 2]], 10, weights=[1.0, 1.0], alpha=0.1)
    tree = build_dynamic_tree(0, lp, budget=8, top_k=3, prior=prior)
    assert best_child(tree) == {1: 4, 2: 5}
    for node in range(1, len(tree)):  # still a valid tree, scores falling along every path
        assert tree.depths[node] == tree.depths[tree.parents[node]] + 1
        assert tree.scores[node] <= tree.scores[tree.parents[node]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="drafts on a CUDA device: needs one")
def test_dynamic_tree_with_a_prior_reads_drafts_on_the_gpu():
    """ht's drafts live on the model's device: the prior's rescoring reads them there (it
    once called .numpy() on CUDA tensors, and every ht step failed on a GPU)."""
    from workers.drafters.successor_prior import SuccessorPrior

    lp = logprobs([{1: 0.5, 2: 0.4}, {3: 0.3, 4: 0.28, 5: 0.27}])
    prior = SuccessorPrior.count([[1, 4], [1, 4], [2, 5], [2, 5], [0, 1], [0, 2]], 10, weights=[1.0, 1.0], alpha=0.1)
    on_cpu = build_dynamic_tree(0, lp, budget=8, top_k=3, prior=prior)
    on_gpu = build_dynamic_tree(0, lp.cuda(), budget=8, top_k=3, prior=prior)
    assert on_gpu.tokens == on_cpu.tokens and on_gpu.parents == on_cpu.parents
    assert on_gpu.scores == pytest.approx(on_cpu.scores)

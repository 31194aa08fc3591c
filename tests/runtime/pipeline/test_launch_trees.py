"""The trees the coordinator launches (runtime.pipeline.launch_trees), and the walk it predicts from drafts."""

import torch

from configs.schema import PldConfig, PseudoStateModeConfig
from runtime.pipeline.launch_trees import (Drafts, LaunchSizer, build_launch_tree, observe_commit, predict_from_drafts,
                                           reply_proposers)
from workers.drafters.base import TreeProposer
from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.tree_sizing import CostCurve, StepCost, TreeSizer

VOCAB = 50


def launch(committed, trunk, alternatives, drafts, chains, ht, pld, continuation_budget, prior=None):
    """A launch tree from a reply whose last commit (its last token, the drafts' anchor)
    brought `drafts`, as the coordinator builds it."""
    recycled = TreeProposer(TokenRecyclingDrafter(VOCAB, 8, max(continuation_budget, 1)), from_root_token=True)
    proposers, continuation = reply_proposers(committed[:-1], ht, pld, prior, recycled)
    observe_commit(proposers, committed[-2], [committed[-1]], [0.0], drafts.after(drafts.anchor, VOCAB))
    return build_launch_tree(committed, trunk, alternatives, chains, proposers, continuation, continuation_budget,
                             ht.pseudo_nodes)


def test_launch_tree_holds_trunk_alternatives_and_continuation():
    drafts = Drafts(anchor=9, tokens=[[11, 12], [21, 22], [31, 32], [41, 42]], logprobs=[[-0.1, -2.0]] * 4)
    committed = list(range(10))  # root = 9, the drafts' anchor
    plan = launch(committed, [11, 21], [23], drafts, [], PseudoStateModeConfig(budget=4, pseudo_nodes=2), None, 4)
    tree = plan.tree
    paths = {tuple(tree.tokens[i] for i in tree.path_to(n)) for n in range(len(tree))}
    assert (9, 11, 21) in paths and (9, 11, 23) in paths  # trunk and the alternative bonus
    assert (9, 11, 21, 31) in paths  # continuation from the drafts after the trunk (depth 3)
    assert tree.tokens[plan.trunk_end] == 21 and 0 in plan.pseudo_nodes and plan.trunk_end in plan.pseudo_nodes
    tokens, alternatives = predict_from_drafts(tree, drafts, 9, 0.5)
    # Confident drafts all the way down (p = 0.9 each); the bonus is the best draft that is
    # not a child of the end node (41 is one: the walk would have descended into it).
    assert tokens == [11, 21, 31, 42] and alternatives == []


def launch_plan(pld=None):
    drafts = Drafts(anchor=9, tokens=[[11, 12], [21, 22], [31, 32], [41, 42]], logprobs=[[-0.1, -2.0]] * 4)
    return launch(list(range(10)), [11, 21], [23], drafts, [[12, 5]], PseudoStateModeConfig(budget=4, pseudo_nodes=2), pld, 4)


def sizer(curve: StepCost) -> LaunchSizer:
    return LaunchSizer(TreeSizer(CostCurve({128: curve})), pseudo_row_cost=0.5, max_depth=4, pseudo_count=2)


def test_launch_nodes_are_labelled_by_origin():
    plan = launch_plan(PldConfig())
    tree = plan.tree
    labels = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]): plan.slots.get(n) for n in range(1, len(tree))}
    assert labels[(12, 5)] == ("chain", 2) and labels[(11, 23)] == ("alternative 0", 2)
    assert labels[(11, 21, 32)] == ("drafted", 1) and labels[(11, 21, 31, 41)] == ("drafted", 2)  # below the trunk
    assert labels[(11,)] is None and labels[(11, 21)] is None  # drafted nodes rated by their drafts


def test_launch_sizer_keeps_the_trunk_and_cuts_the_rest_to_what_pays():
    steep = sizer(StepCost((1, 2, 64), (10.0, 20.0, 640.0)))  # every row doubles the step
    plan = steep.size(launch_plan(), 128)
    assert plan.tree.tokens == [9, 11, 21] and plan.tree.tokens[plan.trunk_end] == 21
    assert plan.draft_depth == 0 and plan.pseudo_nodes == [0, plan.trunk_end]
    flat = sizer(StepCost((1, 64), (10.0, 10.0)))  # free rows
    whole = launch_plan()
    plan = flat.size(whole, 128)
    assert len(plan.tree) == len(whole.tree) and plan.draft_depth == 4
    assert plan.tree.tokens[plan.trunk_end] == 21 and plan.trunk_end in plan.pseudo_nodes


def test_launch_sizer_learns_from_the_walks():
    launches = sizer(StepCost((1, 4, 8, 16), (16.0, 21.0, 28.5, 46.0)))
    plan = launches.size(launch_plan(), 128)
    for _ in range(50):  # the chain's first node is always accepted, then 5 as the bonus token
        launches.observe(plan, [12, 5])
    chain_node = plan.tree.child(0, 12)
    assert launches.sizer.acceptance.probabilities(plan.tree, plan.slots)[chain_node] > 0.9


def test_launch_tree_children_follow_the_successor_prior():
    """With a prior, the drafted nodes below the root get children of their own: after 12
    comes 22 in the counted text, so 22 (the weaker draft) is 12's first child."""
    from workers.drafters.successor_prior import SuccessorPrior

    drafts = Drafts(anchor=9, tokens=[[11, 12], [21, 22]], logprobs=[[-0.1, -0.5], [-0.6, -0.8]])
    ht = PseudoStateModeConfig(budget=6, top_k=2, pseudo_nodes=1)
    plain = launch(list(range(10)), [], [], drafts, [], ht, None, 1)
    prior = SuccessorPrior.count([[12, 22]] * 5 + [[11, 21]] * 5, 50, weights=[1.0, 1.0])
    rescored = launch(list(range(10)), [], [], drafts, [], ht, None, 1, prior=prior)

    def first_child(tree, token):
        node = tree.child(0, token)
        return next(tree.tokens[n] for n in range(len(tree)) if tree.parents[n] == node)

    assert first_child(plain.tree, 12) == 21 and first_child(rescored.tree, 12) == 22


def test_lookup_and_recycling_propose_at_the_root_and_after_the_predicted_trunk():
    """The lookup chain scans the context as it would be after the trunk (the committed
    tokens, then the predicted ones); token recycling proposes from the trunk's last token."""
    committed = [1, 2, 3, 4, 5, 1, 2]
    recycling = TokenRecyclingDrafter(VOCAB, 8, 4)
    recycling.adjacency[3, :2] = torch.tensor([7, 8])  # the target's best next tokens after 3, once seen
    recycled = TreeProposer(recycling, from_root_token=True)
    ht = PseudoStateModeConfig(budget=4, pseudo_nodes=2)
    proposers, continuation = reply_proposers(committed, ht, PldConfig(min_ngram=1, max_ngram=2, depth=3), None, recycled)
    plan = build_launch_tree(committed, [3], [], [], proposers, continuation, 4, ht.pseudo_nodes)
    tree = plan.tree
    labels = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]): plan.slots.get(n) for n in range(1, len(tree))}
    assert labels[(3, 4, 5)] == ("lookup", 3)  # after [1, 2] came 3, 4, 5
    assert labels[(3, 4, 5, 1)] == ("lookup after", 3)  # after [.., 2, 3]: 4, 5, 1 (4 and 5 already there)
    assert labels[(3, 7)] == ("recycled", 1) and labels[(3, 8)] == ("recycled", 1)
    assert tree.tokens[plan.trunk_end] == 3

"""The trees the coordinator launches (runtime.pipeline.launch_trees), and the walk it predicts from drafts."""

from configs.schema import PseudoStateModeConfig
from runtime.pipeline.launch_trees import Drafts, build_launch_tree, predict_from_drafts


def test_launch_tree_holds_trunk_alternatives_and_continuation():
    vocab = 50
    drafts = Drafts(anchor=9, tokens=[[11, 12], [21, 22], [31, 32], [41, 42]], logprobs=[[-0.1, -2.0]] * 4)
    committed = list(range(10))  # root = 9, the drafts' anchor
    plan = build_launch_tree(committed, [11, 21], [23], drafts, [], PseudoStateModeConfig(budget=4, pseudo_nodes=2), None, 4, vocab)
    tree = plan.tree
    paths = {tuple(tree.tokens[i] for i in tree.path_to(n)) for n in range(len(tree))}
    assert (9, 11, 21) in paths and (9, 11, 23) in paths  # trunk and the alternative bonus
    assert (9, 11, 21, 31) in paths  # continuation from the drafts after the trunk (depth 3)
    assert tree.tokens[plan.trunk_end] == 21 and 0 in plan.pseudo_nodes and plan.trunk_end in plan.pseudo_nodes
    tokens, alternatives = predict_from_drafts(tree, drafts, 9, 0.5)
    # Confident drafts all the way down (p = 0.9 each); the bonus is the best draft that is
    # not a child of the end node (41 is one: the walk would have descended into it).
    assert tokens == [11, 21, 31, 42] and alternatives == []

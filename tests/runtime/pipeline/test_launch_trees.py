"""The trees the coordinator launches (runtime.pipeline.launch_trees), and the walk it predicts from drafts."""

from configs.schema import PldConfig, PseudoStateModeConfig
from runtime.pipeline.launch_trees import Drafts, LaunchSizer, build_launch_tree, predict_from_drafts
from workers.tree_sizing import CostCurve, StepCost, TreeSizer


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


def launch_plan(pld=None):
    drafts = Drafts(anchor=9, tokens=[[11, 12], [21, 22], [31, 32], [41, 42]], logprobs=[[-0.1, -2.0]] * 4)
    return build_launch_tree(list(range(10)), [11, 21], [23], drafts, [[12, 5]],
                             PseudoStateModeConfig(budget=4, pseudo_nodes=2), pld, 4, 50)


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
    plain = build_launch_tree(list(range(10)), [], [], drafts, [], ht, None, 1, 50)
    prior = SuccessorPrior.count([[12, 22]] * 5 + [[11, 21]] * 5, 50, weights=[1.0, 1.0])
    rescored = build_launch_tree(list(range(10)), [], [], drafts, [], ht, None, 1, 50, prior=prior)

    def first_child(tree, token):
        node = tree.child(0, token)
        return next(tree.tokens[n] for n in range(len(tree)) if tree.parents[n] == node)

    assert first_child(plain.tree, 12) == 21 and first_child(rescored.tree, 12) == 22

"""Tree sizing (workers.tree_sizing): the tree-size chooser on synthetic step costs, the
pruned trees, and the acceptance estimates learnt from steps."""

import math

import pytest
import torch

from workers.model import ModelArgs
from workers.tree import TokenTree, build_dynamic_tree, chain, graft_chain
from workers.tree_sizing import (
    Acceptance,
    CostCurve,
    Load,
    Rate,
    StepCost,
    TreeSizer,
    best_size,
    keep_most_likely,
    pseudo_row_cost,
)

FLAT = StepCost((1, 64), (10.0, 10.0))  # a GPU: every row free
STEEP = StepCost((1, 2, 64), (10.0, 20.0, 640.0))  # each row costs a whole step
CPU = StepCost((1, 4, 8, 16), (16.0, 21.0, 28.5, 46.0))  # this CPU's bfloat16 curve (docs/results.md)


def test_step_cost_interpolates_and_extrapolates():
    assert CPU(1) == 16.0 and CPU(16) == 46.0
    assert CPU(6) == pytest.approx(21.0 + 2 * 7.5 / 4)
    assert CPU(24) == pytest.approx(46.0 + 8 * 17.5 / 8)  # the last segment's slope beyond
    assert CPU(0) > 0
    for bad in [((1,), (1.0,)), ((4, 1), (1.0, 2.0)), ((1, 2), (1.0, -1.0)), ((1, 2), (1.0, math.inf))]:
        with pytest.raises(ValueError):
            StepCost(*bad)


def test_best_size_on_synthetic_curves():
    probs = [0.9, 0.5, 0.3, 0.2, 0.1, 0.05]
    assert best_size(probs, FLAT) == 6  # free rows: keep every node that may be accepted
    assert best_size([0.0, 0.0], FLAT) == 0  # nothing to gain: the smallest tree
    assert best_size(probs, STEEP) == 0  # one row doubles the step: nothing pays
    # On the CPU curve, by hand: m=0 1/16, m=1 1.9/17.67, m=2 2.4/19.33, m=3 2.7/21,
    # m=4 2.9/22.875, m=5 3.0/24.75: the rate peaks at m=3 (0.1286).
    assert best_size(probs, CPU) == 3
    # Eight pseudo rows: a fixed cost the nodes share, so one more pays (m=3 2.7/37.3, m=4 2.9/39.6, m=5 3.0/41.8).
    assert best_size(probs, CPU, extra_rows=8) == 4


def test_trees_shrink_as_the_pass_they_share_grows():
    """Load-aware sizing: a node pays when it adds tokens per ms to the whole pass, so with
    other requests' rows and tokens in the pass the tree shrinks, and a tree step's extra
    host time can make a one-row step the best."""
    probs = [0.9, 0.8, 0.7, 0.5, 0.4, 0.2]
    alone = best_size(probs, CPU)
    loaded = best_size(probs, CPU, load=Load(rows=7, tokens=7))
    crowded = best_size(probs, CPU, load=Load(rows=15, tokens=15))
    assert alone > loaded > crowded
    measured = StepCost((1, 64), (10.0, 73.0))  # the pass as measured (Load.cost): 1 ms a row
    assert best_size(probs, CPU, load=Load(rows=15, tokens=15, cost=measured)) == 3  # a node pays above ~0.65 tokens a ms
    assert best_size(probs, CPU, load=Load(rows=15, tokens=15, cost=measured, tree_host_ms=20)) == 0
    sizer = TreeSizer(CostCurve({128: CPU}))
    assert sizer.draft_depth(1, 1.0, 2.0, 3, 128) > 0  # alone, drafting pays
    assert sizer.draft_depth(1, 1.0, 2.0, 3, 128, Load(rows=15, tokens=15, tree_host_ms=20)) == 0


def test_keep_most_likely_is_a_tree_in_order():
    logprobs = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    tree = build_dynamic_tree(7, logprobs, 12, 4)
    probs = [math.exp(s) for s in tree.scores]
    for m in range(len(tree)):
        pruned, kept = keep_most_likely(tree, probs, m)
        assert len(pruned) == m + 1 and kept[0] == 0 and kept == sorted(kept)
        assert all(p < i for i, p in enumerate(pruned.parents) if i)
        for new, old in enumerate(kept):  # same tokens, same paths
            assert pruned.tokens[new] == tree.tokens[old]
            assert [kept[n] for n in pruned.path_to(new)] == tree.path_to(old)
        assert sorted(probs[i] for i in kept[1:]) == sorted(probs[1:], reverse=True)[:m][::-1]


def test_certain_nodes_are_kept_and_rate_what_hangs_below_them():
    """A pipelined step's predicted trunk: taken as accepted, kept even where no row pays,
    and the nodes under it rated as if it were accepted."""
    tree = chain(0, [5, 6, 7])
    tree.scores[1:] = [-math.inf] * 3
    graft_chain(tree, [9], None)  # a lookup node beside the trunk
    slots = {3: "below", 4: "beside"}
    certain = frozenset({0, 1, 2})
    assert Acceptance().probabilities(tree, slots, certain) == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5])
    pruned, kept_slots, expected = TreeSizer(CostCurve({128: STEEP})).size(tree, 100, 0.0, slots, certain)
    assert pruned.tokens == [0, 5, 6] and kept_slots == {} and expected == 3.0
    pruned, kept_slots, _ = TreeSizer(CostCurve({128: FLAT})).size(tree, 100, 0.0, slots, certain)
    assert len(pruned) == 5 and sorted(kept_slots.values()) == ["below", "beside"]


def test_calibration_learns_that_drafts_are_overconfident():
    tree = TokenTree([0, 1, 2], [-1, 0, 1], [0, 1, 2], [0.0, math.log(0.8), math.log(0.8 * 0.8)])
    acceptance = Acceptance()
    assert acceptance.probabilities(tree) == pytest.approx([1.0, 0.8, 0.64])  # taken as they are at first
    for _ in range(40):  # the depth-1 draft is accepted one time in four, depth 2 never
        for hit in (True, False, False, False):
            acceptance.observe(tree, [0, 1] if hit else [0])
    p = acceptance.probabilities(tree)
    assert p[1] == pytest.approx(0.25, abs=0.02)
    assert p[2] < 0.03  # from 0.64; not 0: the estimates keep a little of the prior (KEEP)


def test_slot_rates_are_conditional_on_the_parent():
    tree = chain(0, [5, 6, 7])
    tree.scores[1:] = [-math.inf] * 3  # a prompt-lookup chain: no draft probabilities
    slots = {1: 1, 2: 2, 3: 3}
    acceptance = Acceptance()
    assert acceptance.probabilities(tree, slots) == pytest.approx([1.0, 0.5, 0.25, 0.125])  # the prior
    for _ in range(50):  # the first token is accepted half the time, and then the chain always is
        acceptance.observe(tree, [0, 1, 2, 3], slots)
        acceptance.observe(tree, [0], slots)  # slots 2 and 3 learn nothing: their parent was rejected
    p = acceptance.probabilities(tree, slots)
    assert p[1] == pytest.approx(0.5, abs=0.02)
    assert 0.4 < p[3] <= p[1]  # from 0.125 under the prior: deeper slots pass whenever the first does


def test_a_chain_node_gets_the_better_of_its_two_estimates():
    tree = TokenTree([0, 1], [-1, 0], [0, 1], [0.0, math.log(0.1)])  # ht drafts it unlikely
    graft_chain(tree, [1, 2], None)  # prompt lookup proposes it, and one more
    assert tree.scores[2] == -math.inf
    acceptance = Acceptance(slots={1: _rate(0.9), 2: _rate(0.9)})
    assert acceptance.probabilities(tree, {1: 1, 2: 2}) == pytest.approx([1.0, 0.9, 0.81])
    assert Acceptance(use_scores=False).probabilities(tree, {}) == [1.0, 0.0, 0.0]


def _rate(value):
    return Rate(value * 100, 100.0)


def test_sizer_cuts_to_what_pays_and_renumbers_the_slots():
    logprobs = torch.log_softmax(torch.randn(4, 60, generator=torch.Generator().manual_seed(1)) * 4, dim=-1)
    tree = build_dynamic_tree(3, logprobs, 16, 4)
    tree = graft_chain(tree, [11, 12, 13], logprobs)
    node, slots = 0, {}
    for depth, token in enumerate([11, 12, 13], 1):
        node = tree.child(node, token)
        slots[node] = depth
    flat = TreeSizer(CostCurve({128: FLAT}))
    kept, kept_slots, expected = flat.size(tree, 100, 0.0, slots)
    assert len(kept) == len(tree) and kept_slots == slots  # nothing cut on a flat curve
    assert expected == pytest.approx(sum(flat.acceptance.probabilities(tree, slots)))
    steep = TreeSizer(CostCurve({128: STEEP}))
    kept, kept_slots, _ = steep.size(tree, 100, 0.0, slots)
    assert len(kept) == 1 and kept_slots == {}
    cpu = TreeSizer(CostCurve({128: CPU}))
    kept, kept_slots, _ = cpu.size(tree, 100, 0.0, slots)
    assert 1 < len(kept) < len(tree)
    for new, depth in kept_slots.items():
        assert kept.depths[new] == depth and kept.tokens[new] == [11, 12, 13][depth - 1]


def test_cost_curve_from_a_json_profile_picks_the_nearest_context():
    profile = {"ms_median": {"128": {"1": 10.0, "8": 20.0}, "1024": {"1": 12.0, "8": 30.0}}}
    curve = CostCurve.from_profile(profile)
    assert curve.at(100)(8) == 20.0 and curve.at(900)(8) == 30.0 and curve.at(576)(8) == 20.0
    for bad in [{}, {"ms_median": {}}, {"ms_median": {"128": {"1": 1.0}}}, {"ms_median": "x"}]:
        with pytest.raises(ValueError):
            CostCurve.from_profile(bad)


def test_the_curve_reads_the_minimum_times_and_never_falls_with_more_rows():
    """A measured profile's minimum times (a busy machine only adds time), lowered where a
    larger step measured quicker: noise on one row count cannot make it look dearer than more rows."""
    profile = {
        "ms_median": {"128": {"1": 50.0, "2": 60.0, "4": 70.0, "8": 80.0}},
        "ms_min": {"128": {"1": 10.0, "2": 19.0, "4": 14.0, "8": 20.0}},
    }
    cost = CostCurve.from_profile(profile).at(128)
    assert cost.rows == (1, 2, 4, 8) and cost.ms == (10.0, 14.0, 14.0, 20.0)
    assert [cost(n) for n in (1, 3, 8)] == [10.0, 14.0, 20.0]


def test_pseudo_row_cost_follows_the_layers_it_runs():
    args = ModelArgs("llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                     intermediate_size=1536, norm_eps=1e-5)
    assert pseudo_row_cost(args, 0) == pytest.approx(1.0)  # PaSS: a whole row
    medusa, ht = pseudo_row_cost(args, 30), pseudo_row_cost(args, 22)
    assert 0 < medusa < ht < 1  # Medusa: the LM head only; hidden transfer at 22: 8 layers and the head
    assert ht == pytest.approx(0.42, abs=0.02)


def test_a_slot_that_stopped_paying_is_tried_again():
    """A node that is cut teaches nothing; the estimates forget slowly, so it comes back."""
    tree = chain(0, [5])
    tree.scores[1] = -math.inf
    sizer = TreeSizer.for_drafter_trees(CostCurve({128: CPU}))  # one more row: worth it above p ~0.1
    for _ in range(20):  # rejected 20 times in a row
        sizer.observe(tree, [0], {1: 1})
    assert len(sizer.size(tree, 100, 0.0, {1: 1})[0]) == 1  # cut
    other = chain(0, [])  # steps without the node
    offered_again = 0
    for _ in range(200):
        sizer.observe(other, [0], {})
        offered_again += len(sizer.size(tree, 100, 0.0, {1: 1})[0]) == 2
    assert offered_again > 0


def test_draft_depth_pays_for_its_pseudo_rows():
    """The drafts' depth maximises (expected tokens + the tokens each depth gets accepted per
    step) / t(rows + its pseudo rows)."""
    sizer = TreeSizer(CostCurve({128: CPU}))
    sizer.acceptance.per_step.update({1: _rate(0.5), 2: _rate(0.1), 3: _rate(0.01)})
    # 4 rows, 1.5 tokens: d=0 1.5/21, d=1 2.0/24.75, d=2 2.1/28.5: depth 1 (0.0808 against 0.0714, 0.0737).
    assert sizer.draft_depth(4, 1.5, 2.0, 3, 100) == 1
    assert sizer.draft_depth(4, 1.5, 0.1, 3, 100) == 2  # cheap pseudo rows: 2.1/21.375 beats 2.0/21.19
    assert TreeSizer(CostCurve({128: FLAT})).draft_depth(4, 1.5, 2.0, 4, 100) == 4  # free rows: all
    # Each row four times dearer than the one before: the time per token is no match for it.
    exponential = StepCost(tuple(range(1, 16)), tuple(10.0 * 4**n for n in range(15)))
    assert TreeSizer(CostCurve({128: exponential})).draft_depth(4, 1.5, 2.0, 4, 100) == 0


def test_per_step_rates_count_steps_that_drafted_that_deep():
    tree = TokenTree([0, 1, 2], [-1, 0, 1], [0, 1, 2], [0.0, math.log(0.5), math.log(0.25)])
    acceptance = Acceptance()
    for _ in range(100):
        acceptance.observe(tree, [0, 1])  # depth 1 accepted, depth 2 not
        acceptance.observe(chain(0, []), [0])  # a step without drafts: teaches nothing
    assert acceptance.per_step[1].value > 0.8 and acceptance.per_step[2].value < 0.1


def test_a_slot_under_a_scored_node_builds_on_the_parents_probability():
    """A recycled successor under a hidden-transfer node: P(parent accepted) x its slot's rate."""
    tree = TokenTree([0, 1], [-1, 0], [0, 1], [0.0, math.log(0.6)])
    graft_chain(tree, [2, 3], None, at=1)
    slots = {2: ("recycled", (0,)), 3: ("recycled", (0, 0))}
    acceptance = Acceptance(slots={("recycled", (0,)): _rate(0.5), ("recycled", (0, 0)): _rate(0.4)})
    assert acceptance.probabilities(tree, slots) == pytest.approx([1.0, 0.6, 0.3, 0.12])
    acceptance.observe(tree, [0, 1, 2], slots)  # the parent and the first successor accepted
    assert acceptance.slots[("recycled", (0,))].value > 0.5 > acceptance.slots[("recycled", (0, 0))].value

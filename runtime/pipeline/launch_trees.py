"""The token tree of one pipelined step (runtime.pipeline.coordinator), built from what the
coordinator knows when it launches the step:

  drafts       the newest hidden-transfer drafts, candidates per depth for the
               positions after the token they were drafted at (`Drafts.anchor`)
  trunk        predicted tokens after the root: the walk that the steps still in
               flight are expected to commit (their Predictions), bonus tokens included
  alternatives other likely tokens in place of the trunk's last one
  chains       drafts from elsewhere (prompt lookup, the asynchronous drafter, the
               tree of the step in flight)
  recycling    token recycling's table of the target's next tokens after each token

The tree is rooted at the last committed token:

  root ── ht tree from the drafts, each node's children rescored under its token by
    │      the successor prior when there is one (prompt-lookup and drafter chains grafted on)
    └── trunk ... e ── continuation: token recycling's tree after e, the drafts
              │        for the positions after e, the prompt-lookup chain after it
              └── alternatives to e (leaves)

Every node is verified by the worker from the committed root, so a wrong trunk costs
compute, never correctness.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from configs.schema import PldConfig, PseudoStateModeConfig
from workers.drafters.prompt_lookup import lookup
from workers.drafters.successor_prior import SuccessorPrior
from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.tree import TokenTree, build_dynamic_tree, graft_chain, root_only
from workers.tree_sizing import TreeSizer


@dataclass
class Drafts:
    anchor: int  # sequence index of the token they were drafted after
    tokens: list[list[int]]  # (depth, candidates): tokens[d] for sequence index anchor + 1 + d
    logprobs: list[list[float]]

    def after(self, index: int, vocab: int) -> torch.Tensor | None:
        """Dense log-probabilities (depth, vocab) for the positions after sequence index
        `index` (-inf off the candidates), or None when the drafts do not reach them."""
        skip = index - self.anchor
        if skip < 0 or skip >= len(self.tokens):
            return None
        rows = torch.full((len(self.tokens) - skip, vocab), float("-inf"))
        rows.scatter_(1, torch.tensor(self.tokens[skip:]), torch.tensor(self.logprobs[skip:]))
        return rows

    def candidates(self) -> list[int]:
        return sorted({t for row in self.tokens for t in row})


@dataclass
class LaunchTree:
    tree: TokenTree
    pseudo_nodes: list[int]
    trunk_end: int  # node of the trunk's last token (0: no trunk)
    slots: dict[int, Hashable] = field(default_factory=dict)  # unscored nodes -> (origin, depth below it)
    draft_depth: int | None = None  # of the pseudo states (None: the worker's drafter's; 0: none)


def merge_below(tree: TokenTree, node: int, subtree: TokenTree) -> None:
    """Graft every root-to-leaf path of `subtree` (rooted at tree.tokens[node]) below `node`."""
    children = subtree.children()
    for leaf in (i for i in range(1, len(subtree)) if not children[i]):
        graft_chain(tree, [subtree.tokens[i] for i in subtree.path_to(leaf)[1:]], None, at=node)


def build_launch_tree(
    committed: list[int],
    trunk: list[int],
    alternatives: list[int],
    drafts: Drafts | None,
    chains: list[list[int]],
    ht: PseudoStateModeConfig,
    pld: PldConfig | None,
    continuation_budget: int,
    vocab: int,
    recycling: TokenRecyclingDrafter | None = None,
    prior: SuccessorPrior | None = None,
) -> LaunchTree:
    root_index = len(committed) - 1
    at_root = drafts.after(root_index, vocab) if drafts else None
    tree = (root_only(committed[-1]) if at_root is None
            else build_dynamic_tree(committed[-1], at_root, ht.budget, ht.top_k, prior))
    slots: dict[int, Hashable] = {}

    def grafted(origin: str, below: int, graft) -> None:
        """Run `graft`; label the nodes it adds with their origin and depth below `below`."""
        start = len(tree)
        graft()
        for node in range(start, len(tree)):
            slots[node] = (origin, tree.depths[node] - tree.depths[below])

    for chain in chains:
        grafted("chain", 0, lambda: graft_chain(tree, chain, at_root))
    if pld is not None:
        grafted("lookup", 0, lambda: graft_chain(tree, lookup(committed, pld.min_ngram, pld.max_ngram, pld.depth), at_root))
    end = 0
    if trunk:
        for rank, alternative in enumerate(alternatives):
            grafted(f"alternative {rank}", 0, lambda: graft_chain(tree, [*trunk[:-1], alternative], at_root))
        graft_chain(tree, trunk, at_root)
        end = tree.walk(trunk)
        after = drafts.after(root_index + len(trunk), vocab) if drafts else None
        if continuation_budget > 1:
            if recycling is not None:
                grafted("recycled", end, lambda: merge_below(tree, end, recycling.propose(trunk[-1])))
            if after is not None:
                grafted("drafted", end, lambda: merge_below(
                    tree, end, build_dynamic_tree(trunk[-1], after, continuation_budget, ht.top_k, prior)))
        if pld is not None:
            grafted("lookup after", end,
                    lambda: graft_chain(tree, lookup(committed + trunk, pld.min_ngram, pld.max_ngram, pld.depth), None, at=end))
    return LaunchTree(tree, pseudo_nodes(tree, end, ht.pseudo_nodes), end, slots)


def pseudo_nodes(tree: TokenTree, end: int, count: int) -> list[int]:
    """The `count` nodes that get pseudo states: the root, the trunk's end and the best-scored others."""
    best = sorted(range(1, len(tree)), key=lambda i: -tree.scores[i])
    return sorted({0, end, *[i for i in best if i != end][: max(count - 1 - (end > 0), 0)]})


@dataclass
class LaunchSizer:
    """Cuts each launch tree to what pays on the workers' step cost t(n) and picks the depth
    of its pseudo states (workers.tree_sizing), as the single-worker decoder does for its
    trees: the trunk, when there is one, is taken as accepted (a step launched on a
    prediction only adds tokens when the prediction holds) and always kept; every other
    node is rated by its drafts' probability or by its slot's rate, learnt from the walks
    the workers report (`observe`)."""

    sizer: TreeSizer
    pseudo_row_cost: float  # a pseudo-state row's cost against a full row
    max_depth: int  # the workers' drafter's pseudo positions
    pseudo_count: int  # [ht] pseudo_nodes
    depth: int = 1  # of the pseudo states the next launch gets (changes per launch)

    def size(self, plan: LaunchTree, context: int) -> LaunchTree:
        trunk = plan.tree.path_to(plan.trunk_end)  # [0]: no trunk
        pseudo_rows = self.pseudo_rows(len(plan.tree), plan.trunk_end) * self.depth
        tree, slots, expected = self.sizer.size(plan.tree, context, pseudo_rows, plan.slots, frozenset(trunk))
        end = tree.walk([plan.tree.tokens[i] for i in trunk[1:]])
        self.depth = self.sizer.draft_depth(len(tree), expected, self.pseudo_rows(len(tree), end), self.max_depth, context)
        return LaunchTree(tree, pseudo_nodes(tree, end, self.pseudo_count), end, slots, self.depth)

    def pseudo_rows(self, nodes: int, end: int) -> float:
        """Rows (in full rows' cost) that one draft depth adds to a launch of `nodes` tree nodes."""
        return min(max(self.pseudo_count, 1 + (end > 0)), nodes) * self.pseudo_row_cost

    def observe(self, plan: LaunchTree, tokens: list[int]) -> None:
        """A step on `plan` committed `tokens` (its accepted drafts, then the bonus token)."""
        path = [0]
        for token in tokens[:-1]:
            path.append(plan.tree.child(path[-1], token))
        self.sizer.observe(plan.tree, path, plan.slots)


def predict_from_drafts(
    tree: TokenTree, drafts: Drafts, root_index: int, confidence: float, recycling: TokenRecyclingDrafter | None = None
) -> tuple[list[int], list[int]]:
    """The walk a step on `tree` will probably take, without running it: descend to the
    best child while the drafts gave it at least `confidence`; the bonus token is then the
    best candidate that is not a child (the walk ends on a token outside the tree): token
    recycling's next tokens after the end node first, then the drafts'.
    Returns (tokens, alternative bonus tokens); no tokens when neither can say."""
    children, node, tokens = tree.children(), 0, []
    while True:
        best = max(children[node], key=lambda c: tree.scores[c], default=None)
        if best is not None and tree.scores[best] - tree.scores[node] >= math.log(confidence):
            tokens.append(tree.tokens[best])
            node = best
            continue
        skip = root_index + tree.depths[node] - drafts.anchor
        seen = recycling.adjacency[tree.tokens[node]].tolist() if recycling is not None else []
        drafted = drafts.tokens[skip] if 0 <= skip < len(drafts.tokens) else []
        taken = {tree.tokens[c] for c in children[node]}
        ranked = list(dict.fromkeys(t for t in seen + drafted if t >= 0 and t not in taken))
        return (tokens + ranked[:1], ranked[1:]) if ranked else ([], [])

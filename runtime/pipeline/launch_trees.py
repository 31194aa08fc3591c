"""The token tree of one pipelined step (runtime.pipeline.coordinator), built by the
proposers (workers.drafters.base) from what the coordinator knows when it launches it:

  proposers     the reply's proposers at the last committed token, in order, as in the
                single-worker loop: the drafts of the newest verified pass (PassDrafts),
                the prompt-lookup chain
  chains        paths from elsewhere (the asynchronous drafter, the tree of the step in flight)
  trunk         predicted tokens after the root: the walk that the steps still in
                flight are expected to commit (their Predictions), bonus tokens included
  alternatives  other likely tokens in place of the trunk's last one
  continuation  proposers again, each at the trunk's last token, a predicted root
                (Proposal.ahead): token recycling, the drafts, the lookup chain

The tree is rooted at the last committed token:

  root ── the proposers' tree (chains grafted on)
    │
    └── trunk ... e ── continuation: each continuation proposer's tree after e
              │
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
from workers.drafters.base import LookupChain, Proposal, Proposer
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.drafters.pseudo_proposer import PassDrafts
from workers.drafters.successor_prior import SuccessorPrior
from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.tree import TokenTree, chain, graft_chain, root_only
from workers.tree_step import StepOutcome
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


class LearnsNothing:
    """A proposer whose drafts come from elsewhere: the reply's prompt and commits teach it nothing."""

    def start(self, prompt_ids: list[int]) -> None:
        pass

    def observe(self, tree: TokenTree, path: list[int], outcome: StepOutcome) -> None:
        pass

    def skip(self, root: int, outcome: StepOutcome) -> None:
        pass


class CoordinatorTable(LearnsNothing):
    """A proposer whose table the coordinator fills from the workers' results (token
    recycling): it proposes, and what a commit shows it is learnt there, not here."""

    def __init__(self, inner: Proposer):
        self.inner = inner

    def propose(self, proposal: Proposal) -> None:
        self.inner.propose(proposal)


class GivenTree(LearnsNothing):
    """A scored tree drafted elsewhere (the drafter worker's, rooted at the committed root)
    as the proposer that starts a launch's tree."""

    def __init__(self, tree: TokenTree):
        self.tree = tree

    def propose(self, proposal: Proposal) -> None:
        if proposal.ahead:
            return
        t = self.tree  # a copy: the launch grafts onto it
        proposal.tree = TokenTree(list(t.tokens), list(t.parents), list(t.depths), list(t.scores))


def reply_proposers(prompt_ids: list[int], ht: PseudoStateModeConfig | None, pld: PldConfig | None,
                    prior: SuccessorPrior | None, recycled: Proposer) -> tuple[list[Proposer], dict[str, Proposer]]:
    """A reply's proposers, started on its prompt: at the root, the newest pass's drafts
    (without pseudo states, `ht` None: token recycling's tree) and, with `pld`, the
    prompt-lookup chain; after the trunk (name -> proposer), token recycling (`recycled`,
    whose table the coordinator keeps across replies) and the same two."""
    if ht is None:
        proposers, continuation = [CoordinatorTable(recycled)], {"recycled": recycled}
    else:
        drafts = PassDrafts(ht, prior)
        proposers, continuation = [drafts], {"recycled": recycled, "drafted": drafts}
    if pld is not None:
        lookup = LookupChain(PromptLookupDrafter(pld.min_ngram, pld.max_ngram, pld.depth))
        proposers.append(lookup)
        continuation["lookup after"] = lookup
    for proposer in proposers:
        proposer.start(prompt_ids[:-1])  # the last comes back as the first launch's root
    return proposers, continuation


def observe_commit(proposers: list[Proposer], root: int, tokens: list[int], margins: list[float],
                   drafts: torch.Tensor | None) -> None:
    """`tokens` were committed after `root`: the proposers see them as one step from it, with
    `drafts` (depth, vocab) after them: the workers' candidates' log-probabilities, -inf elsewhere."""
    outcome = StepOutcome(list(range(len(tokens))), tokens, margins, None, None, drafts)
    for proposer in proposers:
        proposer.observe(chain(root, tokens[:-1]), outcome.path, outcome)


def build_launch_tree(
    committed: list[int],
    trunk: list[int],
    alternatives: list[int],
    chains: list[list[int]],
    proposers: list[Proposer],
    continuation: dict[str, Proposer],
    continuation_budget: int,
    pseudo_count: int,
) -> LaunchTree:
    """`continuation`: name -> proposer; the name labels the slots of its nodes below the
    trunk for the sizer. `pseudo_count`: the nodes that get pseudo states ([ht] pseudo_nodes)."""
    proposal = Proposal(root_only(committed[-1]))
    for proposer in proposers:
        proposer.propose(proposal)
    tree, slots, at_root = proposal.tree, dict(proposal.slots), proposal.logprobs

    def grafted(origin: str, below: int, graft) -> None:
        """Run `graft`; label the nodes it adds with their origin and depth below `below`."""
        start = len(tree)
        graft()
        for node in range(start, len(tree)):
            slots[node] = (origin, tree.depths[node] - tree.depths[below])

    for path in chains:
        grafted("chain", 0, lambda: graft_chain(tree, path, at_root))
    end = 0
    if trunk:
        for rank, alternative in enumerate(alternatives):
            grafted(f"alternative {rank}", 0, lambda: graft_chain(tree, [*trunk[:-1], alternative], at_root))
        graft_chain(tree, trunk, at_root)
        end = tree.walk(trunk)
        for origin, proposer in continuation.items():
            after = Proposal(root_only(trunk[-1]), ahead=[committed[-1], *trunk[:-1]], budget=continuation_budget)
            proposer.propose(after)
            grafted(origin, end, lambda: merge_below(tree, end, after.tree))
    return LaunchTree(tree, pseudo_nodes(tree, end, pseudo_count), end, slots)


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

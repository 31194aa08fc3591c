"""Pseudo-state drafts as a proposer (`ht`, `medusa`, `pass`): the drafter runs inside the
forward pass that verifies a tree (workers.tree_step), and that pass's pseudo logits
covering the tokens after the accepted path become the next step's tree.

  propose   (PassDrafts) the best paths by draft confidence (workers.tree.build_dynamic_tree),
            each node's children rescored under its own token by the successor prior when
            there is one; a root alone when the last step left no drafts
  in_forward  which pass rows the drafter gets: pseudo states of `depth` positions for the
            `pseudo_nodes` highest-scoring nodes (the loop picks the depth:
            runtime.decoding.speculative)
"""

from __future__ import annotations

import torch

from configs.schema import PseudoStateModeConfig
from workers.drafters.base import Proposal
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.drafters.successor_prior import SuccessorPrior
from workers.model import ModelArgs
from workers.tree import TokenTree, build_dynamic_tree
from workers.tree_sizing import pseudo_row_cost
from workers.tree_step import StepOutcome


class PassDrafts:
    """The drafts of the last verified pass, for the positions after its accepted path, as a
    proposer; needs no drafter weights, so the pipeline's coordinator, whose workers run
    the pseudo states, proposes with it too (runtime.pipeline.launch_trees).

    `drafts` come in each outcome as logits (depth, vocab); the pipeline's workers return
    their top candidates, which come as log-probabilities with -inf elsewhere."""

    scored = True  # its trees carry draft log-probabilities

    def __init__(self, settings: PseudoStateModeConfig, prior: SuccessorPrior | None = None):
        self.settings, self.prior = settings, prior
        self.drafts: torch.Tensor | None = None  # (depth, vocab): the last step's, for the positions after its path

    def start(self, prompt_ids: list[int]) -> None:
        self.drafts = None

    def propose(self, proposal: Proposal) -> None:
        skip = len(proposal.ahead)  # drafts for the positions after the committed root: skip the predicted ones
        if self.drafts is None or skip >= self.drafts.shape[0]:
            return
        if len(proposal.tree) > 1:
            raise ValueError("pseudo-state drafts start the tree: they must be the first proposer")
        logprobs = torch.log_softmax(self.drafts[skip:].float(), dim=-1)
        s = self.settings
        budget = s.budget if proposal.budget is None else proposal.budget
        proposal.tree = build_dynamic_tree(proposal.tree.tokens[0], logprobs, budget, s.top_k, self.prior)
        proposal.logprobs = logprobs

    def observe(self, tree: TokenTree, path: list[int], outcome: StepOutcome) -> None:
        self.drafts = outcome.drafts

    def skip(self, root: int, outcome: StepOutcome) -> None:
        self.drafts = outcome.drafts


class PseudoStateProposer(PassDrafts):
    """PassDrafts with the drafter that makes them in the verifying pass."""

    def __init__(self, drafter: PseudoStateDrafter, settings: PseudoStateModeConfig, args: ModelArgs,
                 prior: SuccessorPrior | None = None):
        super().__init__(settings, prior)
        self.max_depth = min(settings.depth or drafter.config.k, drafter.config.k)
        self.by_depth = {d: drafter.first(d) for d in range(1, self.max_depth + 1)}  # the drafter cut to d positions
        self.pseudo_row_cost = pseudo_row_cost(args, drafter.config.layer)  # a pseudo row against a full row

    def in_forward(self, tree: TokenTree, depth: int) -> tuple[PseudoStateDrafter | None, list[int]]:
        """The drafter cut to `depth` positions (None at 0: no pseudo states, no drafts next
        step) and the nodes that get pseudo states: the highest-scoring, in tree order."""
        drafter = self.by_depth.get(depth)
        if drafter is None:
            return None, []
        best = sorted(range(len(tree)), key=lambda i: -tree.scores[i])[: self.settings.pseudo_nodes]
        return drafter, sorted(best)

    def pseudo_rows(self, nodes: int) -> float:
        """Rows (in full rows' cost) that one draft depth adds to a step of `nodes` tree nodes."""
        return min(self.settings.pseudo_nodes, nodes) * self.pseudo_row_cost

"""Proposers: the one interface of everything that drafts (runtime.decoding.speculative).

Each step the loop asks its proposers, in order, for candidates after the last committed
token (the root). They build one Proposal together: the first usually starts the tree
(hidden-transfer drafts, EAGLE, token recycling, early exit), the ones after it graft onto
it (the prompt-lookup chain). After the tree is verified, every proposer observes the
outcome: which path the target accepted, its logits and hidden states after each node,
and the next drafts of the pseudo states. A proposer never changes what is committed, so
any proposer, or any mix of them, is lossless.

    start(prompt_ids)            a new request; the prompt's last token comes back as the
                                 root of the first step, which no proposer proposes
    propose(proposal)            add candidates below proposal.tree's root, in place; the root
                                 is the last committed token, or (pipeline launches) a predicted
                                 one with `proposal.ahead` the predicted tokens before it
    observe(tree, path, outcome) a proposed tree was verified: `path` (node indices, root
                                 first) accepted
    skip(root, outcome)          a step of `root` alone ran with no proposal (the first step,
                                 and plain steps while other replies share the passes)

A proposer that drafts inside the verifying forward pass (pseudo states:
workers.drafters.pseudo_proposer) also says which rows that pass gets (`in_forward`).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.drafters.prompt_lookup import PromptLookupDrafter, lookup
from workers.tree import TokenTree, graft_chain, root_only
from workers.tree_step import StepOutcome


@dataclass
class Proposal:
    """One step's candidates, built by the proposers in turn."""

    tree: TokenTree  # rooted at the last committed token
    # Nodes the tree sizer rates by how often their slot was accepted (node -> slot), not by
    # a draft probability: a chain's depths, an unscored drafter's node ranks.
    slots: dict[int, Hashable] = field(default_factory=dict)
    # The in-forward drafts' log-probabilities (depth, vocab) for the positions after the
    # root, when a proposer has them: grafted chains are scored by them.
    logprobs: torch.Tensor | None = None
    # The tokens between the last committed token (first) and the root, when the root is a
    # prediction (runtime.pipeline.launch_trees proposes after a predicted trunk); empty:
    # the root is the last committed token. A proposer that cannot propose there leaves
    # the tree alone.
    ahead: list[int] = field(default_factory=list)
    budget: int | None = None  # nodes a tree may have, root included (None: the proposer's setting)


class Proposer(Protocol):
    def start(self, prompt_ids: list[int]) -> None: ...

    def propose(self, proposal: Proposal) -> None: ...

    def observe(self, tree: TokenTree, path: list[int], outcome: StepOutcome) -> None: ...

    def skip(self, root: int, outcome: StepOutcome) -> None: ...


class Drafter(Protocol):
    """What TreeProposer wraps: a drafter that proposes a whole tree from the root."""

    observed_top_k: int  # how many of the target's top tokens after each node `observe` wants

    def start(self, prompt_ids: list[int]) -> None: ...

    def propose(self, root: int) -> TokenTree: ...

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor) -> None: ...


# A drafter that reads the target's features (workers.drafters.eagle) also has
#     feed(hidden)   hidden (m, dim): the last layer's hidden states, before the final norm,
#                    of the positions committed since the last call
#     skip(root)     a step committed `root` with no proposal: what `feed` and `observe`
#                    bring next follows it


class TreeProposer:
    """A drafter that proposes a whole tree (EAGLE, token recycling, early exit) as a
    proposer: it starts the step's tree. `scored`: its trees carry draft log-probabilities
    (EAGLE); otherwise every node is rated by its index in the proposal (its slot).
    `from_root_token`: its tree depends on the root's token alone (token recycling), so it
    proposes after a predicted root too; the others need the committed context."""

    def __init__(self, drafter: Drafter, scored: bool = False, from_root_token: bool = False):
        self.drafter, self.scored, self.from_root_token = drafter, scored, from_root_token
        self.feed = getattr(drafter, "feed", None)

    def start(self, prompt_ids: list[int]) -> None:
        self.drafter.start(prompt_ids)

    def propose(self, proposal: Proposal) -> None:
        if proposal.ahead and not self.from_root_token:
            return
        if len(proposal.tree) > 1:
            raise ValueError(f"{type(self.drafter).__name__} starts the tree: it must be the first proposer")
        proposal.tree = self.drafter.propose(proposal.tree.tokens[0])
        proposal.slots.update({node: node for node in range(1, len(proposal.tree))})

    def observe(self, tree: TokenTree, path: list[int], outcome: StepOutcome) -> None:
        self.drafter.observe(tree, path, torch.topk(outcome.logits, self.drafter.observed_top_k, dim=-1).indices)
        if self.feed is not None:
            self.feed(outcome.hidden[path])

    def skip(self, root: int, outcome: StepOutcome) -> None:
        skip = getattr(self.drafter, "skip", None)
        if skip is not None:
            skip(root)
        if self.feed is not None:  # the catch-up rows' features first (the prompt, on a first step)
            features = outcome.hidden[outcome.path]
            if outcome.catch_up_hidden is not None:
                features = torch.cat((outcome.catch_up_hidden.to(features.dtype), features))
            self.feed(features)


class LookupChain:
    """Prompt lookup as a proposer: the tokens that followed the latest earlier match of the
    context's last n-gram, grafted as a chain below the root (alone: mode `pld`; after
    another proposer: `ht`, `eagle-pld`), scored by the in-forward drafts where there are
    some, and rated by its depth (slot ("lookup", depth)) by the sizer."""

    def __init__(self, lookup: PromptLookupDrafter):
        self.lookup = lookup

    def start(self, prompt_ids: list[int]) -> None:
        self.lookup.start(prompt_ids)

    def propose(self, proposal: Proposal) -> None:
        tree = proposal.tree
        if proposal.ahead:  # after a predicted root: a scan of the context it would have
            d = self.lookup
            tokens = lookup([*d.context, *proposal.ahead, tree.tokens[0]], d.min_ngram, d.max_ngram, d.depth)
        else:
            tokens = self.lookup.drafts(tree.tokens[0])
        proposal.tree = tree = graft_chain(tree, tokens, proposal.logprobs)
        node = 0
        for depth, token in enumerate(tokens, 1):
            node = tree.child(node, token)
            proposal.slots[node] = ("lookup", depth)  # its depth rates it, whoever else proposed the node

    def observe(self, tree: TokenTree, path: list[int], outcome: StepOutcome) -> None:
        self.lookup.observe(tree, path)

    def skip(self, root: int, outcome: StepOutcome) -> None:
        self.lookup.observe(root_only(root), [0])

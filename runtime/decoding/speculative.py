"""The speculative loop: every single-worker mode but `ar` and the peers (runtime.modes).

    first step   the prompt as catch-up rows before a tree of its last token alone
                 (workers.tree_step): the first token, and the first drafts where a
                 proposer drafts in the forward pass
    each step    propose  every proposer adds its candidates after the last committed
                          token (workers.drafters.base: one tree, one Proposal)
                 size     the tree cut to the nodes whose expected acceptance pays for
                          their rows on this device (workers.tree_sizing), and the depth
                          of the next drafts chosen the same way
                 verify   one tree step: the walk with the target's choices is committed,
                          its KV kept
                 observe  every proposer and the sizer see the outcome
                 stream   the committed tokens, clipped at max_new_tokens and stop tokens

While other replies share the passes and the engine says so (`Lane.plain_now`: on a CPU),
a step is plain: the root alone, no drafts. Through a `lane` (runtime.batching) each
step runs in one pass with the steps of the other replies decoding at once, its tree sized
for that pass. Whatever the proposers propose, the tokens are the target's: every mode is
`ar`'s reply.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import replace

import torch

from runtime.batching.step_batcher import Lane
from runtime.decoding.steps import Step, clip_step
from workers.drafters.base import Proposal, Proposer
from workers.drafters.pseudo_proposer import PseudoStateProposer
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.sampling import Chooser
from workers.tree import TokenTree, root_only
from workers.tree_sizing import Load, TreeSizer
from workers.tree_step import StepOutcome, prepare_tree_step, verify


class SpeculativeDecoder:
    def __init__(self, model: Transformer, cache: KVCache, proposers: list[Proposer], sizer: TreeSizer | None = None,
                 lane: Lane | None = None):
        """`proposers` in the order they build a tree (the one that drafts in the forward
        pass, if any, first); `sizer`, when given, cuts every tree to what pays on this
        device, in the pass it shares with other replies' steps when a `lane` runs them."""
        self.model, self.cache, self.proposers, self.sizer, self.lane = model, cache, proposers, sizer, lane
        self.pseudo = next((p for p in proposers if isinstance(p, PseudoStateProposer)), None)
        # A proposer that reads the target's features (EAGLE's `feed`) needs a tree step's hidden states.
        self.reads_features = any(getattr(p, "feed", None) is not None for p in proposers)
        self.depth = self.pseudo.max_depth if self.pseudo else 0  # of the drafts the next step makes
        self.expected = 1.0  # tokens the next step is expected to commit (the sizer's estimate)

    def load(self) -> Load:
        return self.lane.others() if self.lane is not None else Load()

    def propose(self, root: int) -> tuple[TokenTree, dict[int, Hashable]]:
        """The next step's tree and the slots of its unscored nodes; sets the depth of the
        drafts the step makes and the tokens it is expected to commit."""
        proposal = Proposal(root_only(root))
        for proposer in self.proposers:
            proposer.propose(proposal)
        tree, slots, self.expected = proposal.tree, proposal.slots, 1.0
        if self.sizer is None:
            return tree, slots
        load = self.load()
        if len(tree) > 1:
            extra = self.pseudo.pseudo_rows(len(tree)) * self.depth if self.pseudo else 0.0
            tree, slots, self.expected = self.sizer.size(tree, self.cache.length, extra, slots, load=load)
        if self.pseudo:
            self.depth = self.sizer.draft_depth(len(tree), self.expected, self.pseudo.pseudo_rows(len(tree)),
                                                self.pseudo.max_depth, self.cache.length, load)
        return tree, slots

    def first_depth(self, context: int) -> int:
        """How deep the first step (the prompt, then its last token as a root) drafts: all
        the way without a sizer; alone, at least one depth (a probe: a depth the last reply
        gave up on comes back); sharing passes, as deep as pays in the pass the second step
        joins, which with the load of a busy server is often not at all."""
        if self.pseudo is None or (self.lane is not None and self.lane.plain_now()):
            return 0
        if self.sizer is None:
            return self.pseudo.max_depth
        load = self.load()
        if load == Load():
            return max(self.depth, 1)
        return self.sizer.draft_depth(1, 1.0, self.pseudo.pseudo_rows(1), self.pseudo.max_depth, context, load)

    def verify(self, tree: TokenTree, choose: Chooser, index: int, catch_up: list[int] = ()) -> StepOutcome:
        """One tree step (its first child is reply token `index`) after the catch-up tokens,
        with pseudo states at the current depth when a proposer drafts in the pass."""
        drafter, groups = self.pseudo.in_forward(tree, self.depth) if self.pseudo else (None, [])
        prepared = prepare_tree_step(self.model, self.cache, tree, choose, index, catch_up, drafter, groups)
        rows = None
        if self.pseudo:
            rows = len(catch_up) + len(tree) + len(groups) * prepared.k * self.pseudo.pseudo_row_cost
        return verify(self.model, prepared, self.lane, self.expected, rows)

    def unproposed(self, root: int, choose: Chooser, index: int, catch_up: list[int] = (),
                   lead: torch.Tensor | None = None) -> StepOutcome:
        """A step of `root` alone (the first step, after the catch-up; a plain step): every
        proposer skips it. `lead`: the final states of prompt rows run before the catch-up."""
        self.expected = 1.0
        outcome = self.verify(root_only(root), choose, index, catch_up)
        if lead is not None and lead.shape[0]:
            before = outcome.catch_up_hidden
            outcome = replace(outcome, catch_up_hidden=lead if before is None else torch.cat((lead.to(before.dtype), before)))
        for proposer in self.proposers:
            proposer.skip(root, outcome)
        if self.sizer is not None and outcome.drafts is not None:  # it drafted: the sizer counts its depths
            self.sizer.observe(root_only(root), outcome.path)
        return outcome

    def plain(self, root: int, choose: Chooser, index: int) -> StepOutcome:
        """A plain step while other replies share the passes: `ar`'s own step through the lane
        (as little Python as `ar`'s, which every reply of the pass waits for) unless a
        proposer reads the target's features, which only a tree step returns."""
        self.depth = 0
        if self.reads_features:
            return self.unproposed(root, choose, index)
        logits = self.lane.decode(self.model, self.cache, root)
        token, margin = choose.choose(logits, index)
        outcome = StepOutcome([0], [token], [margin], logits[None], None, None)
        for proposer in self.proposers:
            proposer.skip(root, outcome)
        return outcome

    def proposed(self, root: int, choose: Chooser, index: int) -> StepOutcome:
        tree, slots = self.propose(root)
        outcome = self.verify(tree, choose, index)
        for proposer in self.proposers:
            proposer.observe(tree, outcome.path, outcome)
        if self.sizer is not None:
            self.sizer.observe(tree, outcome.path, slots)
        return outcome

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], choose: Chooser) -> Iterator[Step]:
        self.cache.truncate(0)
        for proposer in self.proposers:
            proposer.start(prompt_ids[:-1])  # the last comes back as the first step's root
        self.depth = self.first_depth(len(prompt_ids))
        lead, catch_up = None, prompt_ids[:-1]
        if self.lane is not None:  # a long prompt in chunks that share the other replies' passes
            lead, catch_up = self.lane.lead_in(self.model, self.cache, catch_up)
        outcome = self.unproposed(prompt_ids[-1], choose, 0, catch_up, lead)
        produced = 0
        while True:
            tokens, margins, done = clip_step(outcome.tokens, outcome.margins, produced, max_new_tokens, stop_ids)
            produced += len(tokens)
            yield Step(tokens, margins)
            if done:
                return
            if self.lane is not None and self.lane.plain_now():  # other replies share the passes
                outcome = self.plain(tokens[-1], choose, produced)
            else:
                outcome = self.proposed(tokens[-1], choose, produced)

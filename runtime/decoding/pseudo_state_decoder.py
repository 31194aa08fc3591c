"""Pseudo-state decoding (modes `ht`, `medusa`, `pass`, `ht-pld`): verify a token tree and
draft the next one in one forward pass (workers.tree_step with a drafter of
workers.drafters.pseudo_states at layer L: 0 < L < N for hidden transfer, N for Medusa
heads, 0 for PaSS look-ahead embeddings).

  first step   the prompt as catch-up rows before a root-only tree of its last token,
               pseudo states at the root: the first token and the first drafts
  each step    a tree from the drafts (best paths by draft confidence, each node's
               children rescored under its own token by the successor prior when
               there is one, and shifted by the conditional head on it, or a fixed template), the prompt-lookup chain grafted
               on (`ht-pld`), each node's
               recycled successors grafted under it (token recycling's table: drafts
               that depend on the node's own token); pseudo states
               for the highest-scoring nodes; the walk with the target's choices is
               committed, and the pseudo logits covering the tokens after it draft the
               next tree

While other replies share the passes and the engine says so (`Lane.plain_now`: on a CPU),
every step is `ar`'s (`plain_step`): no tree, no drafts.

With a TreeSizer (workers.tree_sizing), each tree is first built at the configured
budget, lookup chain and recycled successors included, and then cut to the nodes whose expected acceptance pays
for their rows on this device's step cost; and the step drafts only as deep as each
depth's accepted tokens pay for its pseudo rows (depth 0: none, the next tree is the
lookup chain alone, and the depths come back as their estimates forget).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch

from configs.schema import PseudoStateModeConfig
from runtime.decoding.steps import Step, clip_step
from workers.batched_step import Lane
from workers.drafters.conditional_head import ConditionedHead
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.drafters.successor_prior import SuccessorPrior
from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.sampling import Chooser
from workers.tree import DEFAULT_TEMPLATE, TokenTree, build_dynamic_tree, build_template_tree, graft_chain, root_only
from workers.tree_sizing import Load, TreeSizer, pseudo_row_cost
from workers.tree_step import StepOutcome, prepare_tree_step, verify


class PseudoStateDecoder:
    def __init__(
        self,
        model: Transformer,
        drafter: PseudoStateDrafter,
        cache: KVCache,
        settings: PseudoStateModeConfig,
        lookup: PromptLookupDrafter | None = None,
        sizer: TreeSizer | None = None,
        recycling: TokenRecyclingDrafter | None = None,
        prior: SuccessorPrior | None = None,
        lane: Lane | None = None,
        head: ConditionedHead | None = None,
    ):
        """`settings` size each step's tree and the drafter's depth; `lookup`, when given,
        grafts its prompt-lookup chain onto every tree (mode ht-pld); `recycling`, when
        given, grafts its table's successors under every drafted node; `prior`, when
        given, rescores each node's children under its own token (dynamic trees), and
        `head` (a conditional head on that prior) shifts them by the node's pseudo state;
        `sizer`, when given, cuts every tree to what pays on this device (settings.budget
        is then the most), in the pass it shares with other replies' steps when a `lane`
        (workers.batched_step) runs them together."""
        self.max_depth = min(settings.depth or drafter.config.k, drafter.config.k)
        self.drafters = {d: drafter.first(d) for d in range(1, self.max_depth + 1)}  # by draft depth
        self.model, self.cache, self.settings = model, cache, settings
        self.lookup, self.sizer, self.recycling, self.prior, self.lane = lookup, sizer, recycling, prior, lane
        self.head = head
        self.pseudo_row_cost = pseudo_row_cost(model.args, drafter.config.layer)
        self.depth = self.max_depth  # of the drafts the next step makes (the sizer may change it per step)
        self.expected = 1.0  # tokens the next step is expected to commit (the sizer's estimate; 1 without one)

    def build_tree(self, root: int, drafts: torch.Tensor | None,
                   states: torch.Tensor | None = None) -> tuple[TokenTree, dict[int, Hashable]]:
        """The next step's tree, and the slots of its unscored drafts (node -> slot): the
        lookup chain's depths, the recycled successors' rank paths. `states`: the pseudo
        states behind `drafts`, before the final norm (for the conditional head)."""
        logprobs = None if drafts is None else torch.log_softmax(drafts.float(), dim=-1)
        if logprobs is None:
            tree = root_only(root)
        elif self.settings.tree == "template":
            tree = build_template_tree(root, logprobs, DEFAULT_TEMPLATE[: self.settings.budget - 1])
        else:
            rescore = self.prior
            if self.head is not None and states is not None:
                rescore = self.head.for_step(self.model.norm(states))
            tree = build_dynamic_tree(root, logprobs, self.settings.budget, self.settings.top_k, rescore)
        drafted, slots = len(tree), {}
        if self.lookup is not None:
            tokens = self.lookup.drafts(root)
            tree = graft_chain(tree, tokens, logprobs)
            node = 0
            for depth, token in enumerate(tokens, 1):
                node = tree.child(node, token)
                slots[node] = depth
        if self.recycling is not None:
            for node, slot in self.recycling.graft_successors(tree, list(range(drafted))).items():
                slots.setdefault(node, slot)
        if self.sizer is not None:
            expected, load = 1.0, self.lane.others() if self.lane is not None else Load()
            if len(tree) > 1:
                pseudo_rows = self.pseudo_rows(len(tree)) * self.depth
                tree, slots, expected = self.sizer.size(tree, self.cache.length, pseudo_rows, slots, load=load)
            self.depth = self.sizer.draft_depth(len(tree), expected, self.pseudo_rows(len(tree)), self.max_depth,
                                                self.cache.length, load)
            self.expected = expected
        return tree, slots

    def first_depth(self, context: int) -> int:
        """How deep the first step (the prompt, then its last token as a root) drafts: all
        the way without a sizer; alone, at least one depth (a probe: a depth the last reply
        gave up on comes back); sharing passes, as deep as pays in the pass the second step
        joins, which with the load of a busy server is often not at all (its drafts would
        only grow that step's tree)."""
        if self.lane is not None and self.lane.plain_now():
            return 0
        if self.sizer is None:
            return self.max_depth
        load = self.lane.others() if self.lane is not None else Load()
        if load == Load():
            return max(self.depth, 1)
        return self.sizer.draft_depth(1, 1.0, self.pseudo_rows(1), self.max_depth, context, load)

    def pseudo_rows(self, nodes: int) -> float:
        """Rows (in full rows' cost) that one draft depth adds to a step of `nodes` tree nodes."""
        return min(self.settings.pseudo_nodes, nodes) * self.pseudo_row_cost

    def pseudo_groups(self, tree: TokenTree) -> list[int]:
        """Nodes that get pseudo states: the highest-scoring ones, in tree order."""
        best = sorted(range(len(tree)), key=lambda i: -tree.scores[i])[: self.settings.pseudo_nodes]
        return sorted(best)

    def step(self, tree: TokenTree, choose: Chooser, index: int, catch_up: list[int] = (),
             slots: dict[int, Hashable] | None = None) -> StepOutcome:
        """Verify `tree` (its first child is reply token `index`) after the catch-up tokens;
        `slots`: its unscored drafts' slots (build_tree)."""
        drafter = self.drafters.get(self.depth)  # None at depth 0: no pseudo states, no drafts next step
        groups = self.pseudo_groups(tree) if drafter is not None else []
        prepared = prepare_tree_step(self.model, self.cache, tree, choose, index, catch_up, drafter, groups)
        rows = len(catch_up) + len(tree) + len(groups) * prepared.k * self.pseudo_row_cost
        outcome = verify(self.model, prepared, self.lane, self.expected, rows)
        if self.lookup is not None:
            self.lookup.observe(tree, outcome.path)
        if self.recycling is not None:
            top = torch.topk(outcome.logits, self.recycling.observed_top_k, dim=-1).indices
            self.recycling.observe(tree, outcome.path, top)
        if self.sizer is not None:
            self.sizer.observe(tree, outcome.path, slots)
        return outcome

    def plain_step(self, token: int, choose: Chooser, index: int) -> StepOutcome:
        """`ar`'s step through the lane (reply token `index` after `token`), with no drafts for
        the next: while other replies share the passes, as little Python as `ar`'s (it runs
        one reply at a time and holds every reply's next pass up). The lookup chain's index
        still sees the token."""
        self.depth, self.expected = 0, 1.0
        logits = self.lane.decode(self.model, self.cache, token)
        chosen, margin = choose.choose(logits, index)
        if self.lookup is not None:
            self.lookup.observe(root_only(token), [0])
        return StepOutcome([0], [chosen], [margin], logits[None], None, None)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], choose: Chooser) -> Iterator[Step]:
        self.cache.truncate(0)
        self.depth = self.first_depth(len(prompt_ids))
        if self.lookup is not None:
            self.lookup.start(prompt_ids[:-1])  # its last token comes back as the first step's root
        catch_up = self.lane.lead_in(self.model, self.cache, prompt_ids[:-1])[1] if self.lane is not None else prompt_ids[:-1]
        outcome = self.step(root_only(prompt_ids[-1]), choose, 0, catch_up)
        produced = 0
        while True:
            tokens, margins, done = clip_step(outcome.tokens, outcome.margins, produced, max_new_tokens, stop_ids)
            produced += len(tokens)
            yield Step(tokens, margins)
            if done:
                return
            if self.lane is not None and self.lane.plain_now():  # other replies share the passes
                outcome = self.plain_step(tokens[-1], choose, produced)
            else:
                tree, slots = self.build_tree(tokens[-1], outcome.drafts, outcome.draft_states)
                outcome = self.step(tree, choose, produced, slots=slots)

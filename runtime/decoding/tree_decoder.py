"""Tree decoding for drafters that propose tokens from outside the model (modes `pld`,
`token-recycling`, `early-exit`, `eagle`, `eagle-pld`: workers.drafters).

After the prefill, every step is one tree step (workers.tree_step) without pseudo
states: the drafter's tree, rooted at the bonus token of the previous step, runs
through all layers with its ancestor-only mask; the walk with the target's choices is
committed and its KV kept; the drafter then sees the tree, the path and the target's
top-k after every node (`observe`), and a drafter that reads the target's features
(EAGLE) gets the last layer's hidden states of the prompt and of each accepted path (`feed`).

With a TreeSizer (workers.tree_sizing), each proposal is cut to the nodes whose expected
acceptance pays for their rows on this device. A drafter's tree carries no draft
probabilities (its sizer ignores scores), so each node is rated by how often the target
accepted its slot (its index in the proposal: the depth in a chain, the entry of a fixed
tree) after its parent.

While other replies share the passes and the engine says so (`Lane.plain_now`: on a CPU),
every step is plain: the root alone.

With a `lookup` drafter (mode `eagle-pld`), its prompt-lookup chain is grafted onto every
proposal, as `ht` grafts it onto hidden-transfer trees: a chain node the drafter also
proposed keeps its score, a new one is rated by its slot ("lookup", depth).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch

from runtime.decoding.autoregressive import prefill_hidden
from runtime.decoding.steps import Step, clip_step
from workers.batched_step import Lane
from workers.drafters.base import Drafter
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.sampling import Chooser
from workers.tree import TokenTree, graft_chain, root_only
from workers.tree_sizing import Load, TreeSizer
from workers.tree_step import prepare_tree_step, verify


class TreeDecoder:
    def __init__(self, model: Transformer, cache: KVCache, drafter: Drafter, sizer: TreeSizer | None = None,
                 lookup: PromptLookupDrafter | None = None, lane: Lane | None = None):
        """`lane`, when given, runs each step in one pass with other replies' steps
        (workers.batched_step), and the sizer sizes the tree for that pass."""
        self.model, self.cache, self.drafter, self.sizer, self.lookup = model, cache, drafter, sizer, lookup
        self.lane = lane

    def propose(self, root: int) -> tuple[TokenTree, dict[int, Hashable], float]:
        """The drafter's tree with the lookup chain grafted on, cut by the sizer; its nodes'
        slots (node -> index in the proposal, or ("lookup", depth) on the chain); the tokens
        it is expected to commit (the sizer's estimate; 1 without one)."""
        if self.lane is not None and self.lane.plain_now():  # other replies share the passes: a plain step
            skip = getattr(self.drafter, "skip", None)  # a drafter that catches up on what it did not propose
            if skip is not None:
                skip(root)
            return root_only(root), {}, 1.0
        tree = self.drafter.propose(root)
        slots: dict[int, Hashable] = {node: node for node in range(1, len(tree))}
        if self.lookup is not None:
            tokens = self.lookup.drafts(root)
            tree, node = graft_chain(tree, tokens, None), 0
            for depth, token in enumerate(tokens, 1):
                node = tree.child(node, token)
                slots[node] = ("lookup", depth)
        if self.sizer is None or len(tree) == 1:
            return tree, slots, 1.0
        load = self.lane.others() if self.lane is not None else Load()
        return self.sizer.size(tree, self.cache.length, 0.0, slots, load=load)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], choose: Chooser) -> Iterator[Step]:
        self.cache.truncate(0)
        self.drafter.start(prompt_ids)
        if self.lookup is not None:
            self.lookup.start(prompt_ids)
        feed = getattr(self.drafter, "feed", None)  # a drafter that reads the target's features (base.Drafter)
        hidden, logits = prefill_hidden(self.model, self.cache, prompt_ids, self.lane)
        if feed is not None:
            feed(hidden)
        token, margin = choose.choose(logits, 0)
        produced = 1
        yield Step([token], [margin])
        if token in stop_ids or max_new_tokens == 1:
            return
        while True:
            tree, slots, expected = self.propose(token)
            outcome = verify(self.model, prepare_tree_step(self.model, self.cache, tree, choose, produced), self.lane, expected)
            if self.sizer is not None:
                self.sizer.observe(tree, outcome.path, slots)
            self.drafter.observe(tree, outcome.path, torch.topk(outcome.logits, self.drafter.observed_top_k, dim=-1).indices)
            if self.lookup is not None:
                self.lookup.observe(tree, outcome.path)
            if feed is not None:
                feed(outcome.hidden[outcome.path])
            tokens, margins, done = clip_step(outcome.tokens, outcome.margins, produced, max_new_tokens, stop_ids)
            produced += len(tokens)
            yield Step(tokens, margins)
            if done:
                return
            token = tokens[-1]

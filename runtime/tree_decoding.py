"""Tree verification for drafters that propose tokens from outside the model.

One step, with P tokens already in the cache and a tree of n nodes from the drafter,
rooted at the bonus token of the previous step:

  forward     the n nodes through all layers (ancestor-only mask, positions P + depth)
  LM head     every node
  accept      walk down from the root: choose the target's token after the node
              (greedy or sampled, runtime.sampling); descend to the child holding that
              token, else stop with it as the bonus token
  KV          the path's entries are compacted in place, the rest dropped
  observe     the drafter sees the tree, the path and the target's top-k after every node

Hidden transfer (runtime.ht_decoding) drafts inside the verifying forward pass instead,
but shares `accept` and the step bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from runtime.decoding import Step, clip_step, prefill
from runtime.sampling import Greedy, Sampler
from workers.drafters.base import Drafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree import TokenTree


def accept(
    tree: TokenTree, logits: torch.Tensor, choose: Greedy | Sampler, index: int
) -> tuple[list[int], list[int], list[float]]:
    """Walk the tree from the root with the target's choices.

    logits (n, vocab) are the target's after every node; the choice after the node at
    depth d is reply token index + d. Returns the path (node indices, root first), the
    committed tokens (the path's drafts, then the bonus token) and their margins.
    """
    children = tree.children()
    path, tokens, margins = [0], [], []
    while True:
        token, margin = choose.choose(logits[path[-1]], index + len(tokens))
        tokens.append(token)
        margins.append(margin)
        match = next((c for c in children[path[-1]] if tree.tokens[c] == token), None)
        if match is None:
            return path, tokens, margins
        path.append(match)


class TreeDecoder:
    def __init__(self, model: Transformer, cache: KVCache, drafter: Drafter):
        self.model, self.cache, self.drafter = model, cache, drafter

    def forward_tree(self, tree: TokenTree) -> torch.Tensor:
        """Logits (n, vocab) after every node of `tree`; writes n pending cache positions."""
        model = self.model
        positions = self.cache.length + torch.tensor(tree.depths, device=model.device)
        tokens = torch.tensor([tree.tokens], device=model.device)
        h = model.run_layers(model.embed(tokens), model.context(positions, self.cache, tree.ancestor_mask(model.device)))
        return model.lm_head(model.norm(h[0]))

    def step(self, tree: TokenTree, choose: Greedy | Sampler, index: int) -> tuple[list[int], list[float]]:
        """Verify `tree`, whose first child is reply token `index`; returns the committed
        tokens (accepted drafts + bonus) and their margins."""
        logits = self.forward_tree(tree)
        path, tokens, margins = accept(tree, logits, choose, index)
        self.cache.keep(path)
        self.drafter.observe(tree, path, torch.topk(logits, self.drafter.observed_top_k, dim=-1).indices)
        return tokens, margins

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], choose: Greedy | Sampler
    ) -> Iterator[Step]:
        self.cache.truncate(0)
        self.drafter.start(prompt_ids)
        token, margin = choose.choose(prefill(self.model, self.cache, prompt_ids), 0)
        produced = 1
        yield Step([token], [margin])
        if token in stop_ids or max_new_tokens == 1:
            return
        while True:
            tokens, margins = self.step(self.drafter.propose(token), choose, produced)
            tokens, margins, done = clip_step(tokens, margins, produced, max_new_tokens, stop_ids)
            produced += len(tokens)
            yield Step(tokens, margins)
            if done:
                return
            token = tokens[-1]

"""Tree verification for drafters that propose tokens from outside the model.

One step, with P tokens already in the cache and a tree of n nodes from the drafter,
rooted at the bonus token of the previous step:

  forward     the n nodes through all layers (ancestor-only mask, positions P + depth)
  LM head     every node; the target's argmax after node i is targets[i]
  accept      the longest root path whose every token is its parent's target, plus the
              bonus token (the target after the path's last node)
  KV          the path's entries are compacted in place, the rest dropped
  observe     the drafter sees the tree, the path and the target's top-k after every node

Hidden transfer (runtime.ht_decoding) drafts inside the verifying forward pass instead,
but shares `accept_greedy` and the step bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from runtime.decoding import Step, clip_step, greedy, prefill
from workers.drafters.base import Drafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree import TokenTree


def accept_greedy(tree: TokenTree, targets: list[int]) -> list[int]:
    """Longest root path whose every child token equals the target's argmax at its parent.

    targets[i] is the target's greedy token after node i. Returns node indices, root first.
    """
    children = tree.children()
    path = [0]
    while True:
        match = next((c for c in children[path[-1]] if tree.tokens[c] == targets[path[-1]]), None)
        if match is None:
            return path
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

    def step(self, tree: TokenTree) -> tuple[list[int], list[float]]:
        """Verify `tree`; returns the committed tokens (accepted drafts + bonus) and their margins."""
        top = torch.topk(self.forward_tree(tree).float(), max(2, self.drafter.observed_top_k), dim=-1)
        targets = top.indices[:, 0].tolist()
        path = accept_greedy(tree, targets)
        self.cache.keep(path)
        self.drafter.observe(tree, path, top.indices)
        margins = (top.values[path, 0] - top.values[path, 1]).tolist()
        return [tree.tokens[i] for i in path[1:]] + [targets[path[-1]]], margins

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> Iterator[Step]:
        self.cache.truncate(0)
        self.drafter.start(prompt_ids)
        token, margin = greedy(prefill(self.model, self.cache, prompt_ids))
        produced = 1
        yield Step([token], [margin])
        if token in stop_ids or max_new_tokens == 1:
            return
        while True:
            tokens, margins = self.step(self.drafter.propose(token))
            tokens, margins, done = clip_step(tokens, margins, produced, max_new_tokens, stop_ids)
            produced += len(tokens)
            yield Step(tokens, margins)
            if done:
                return
            token = tokens[-1]

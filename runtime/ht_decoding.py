"""Pseudo-state decoding (ht, medusa, pass): verify a token tree and draft the next one
in one forward pass. The drafter (workers.drafters.pseudo_states) sits at layer L:
0 < L < N for hidden transfer, N for Medusa heads, 0 for PaSS look-ahead embeddings.

One step, with P tokens already in the cache and a tree of n nodes rooted at the bonus
token of the previous step:

  layers [0, L)      the n tree nodes (ancestor-only mask, positions P + depth)
  transfer           for m chosen nodes x, k pseudo states at positions pos(x) + 1..k
  layers [L, N)      the n nodes and the m*k pseudo states together
  LM head            node logits verify the tree; pseudo logits are the next drafts

Acceptance (runtime.tree_decoding.accept) walks down the tree with the target's greedy
or sampled choices and ends with the bonus token. The path's KV entries
are compacted in place; pseudo states and rejected nodes are dropped. The next tree is
drafted from the pseudo states of the path's last node. (With L = N the second layer
range is empty: Medusa's heads feed the norm and LM head directly.)
"""

from __future__ import annotations

from collections.abc import Iterator
import torch

from runtime.config import HtConfig
from runtime.decoding import Step, clip_step
from runtime.sampling import Greedy, Sampler
from runtime.tree_decoding import accept
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.tree import (
    DEFAULT_TEMPLATE,
    TokenTree,
    build_dynamic_tree,
    build_template_tree,
    graft_chain,
    root_only,
)


def pseudo_mask(node_mask: torch.Tensor, groups: list[int], k: int, pseudo_attention: bool) -> torch.Tensor:
    """Mask over [nodes | pseudo states] for n nodes plus k pseudo states per node in `groups`.

    Pseudo state (x, j) sees what node x sees, x itself, and pseudo states (x, < j) when
    `pseudo_attention`; nodes never see pseudo states.
    """
    n, m = node_mask.shape[0], len(groups)
    full = torch.zeros(n + m * k, n + m * k, dtype=torch.bool, device=node_mask.device)
    full[:n, :n] = node_mask
    full[n:, :n] = node_mask[groups].repeat_interleave(k, dim=0)
    block = torch.ones(k, k, dtype=torch.bool).tril() if pseudo_attention else torch.eye(k, dtype=torch.bool)
    full[n:, n:] = torch.block_diag(*[block] * m).to(node_mask.device)
    return full


def transfer_forward(
    model: Transformer,
    ht: PseudoStateDrafter,
    cache: KVCache,
    tokens: list[int],
    positions: torch.Tensor,
    node_mask: torch.Tensor,
    groups: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward n new tokens with pseudo states for the nodes in `groups`.

    Returns final-normed hidden states of the nodes (n, dim) and of the pseudo states
    (len(groups), k, dim): the caller applies the LM head (nodes to verify the tree,
    pseudo states to draft the next one). Writes n
    pending positions to the cache (n + m*k in the layers above the transfer); commits
    nothing.
    """
    n, k, L = len(tokens), ht.config.k, ht.config.layer
    h = model.embed(torch.tensor([tokens], device=model.device))
    h = model.run_layers(h, model.context(positions, cache, node_mask), 0, L)
    pseudo = ht(h[0, groups]).reshape(1, len(groups) * k, -1)  # (1, m*k, dim)
    offsets = torch.arange(1, k + 1, device=positions.device)
    pseudo_pos = (positions[groups, None] + offsets).reshape(-1)
    mask = pseudo_mask(node_mask, groups, k, ht.config.pseudo_attention)
    h = torch.cat((h, pseudo.to(h.dtype)), dim=1)
    h = model.run_layers(h, model.context(torch.cat((positions, pseudo_pos)), cache, mask), L)
    h = model.norm(h[0])
    return h[:n], h[n:].reshape(len(groups), k, -1)


def next_drafts(tree: TokenTree, path: list[int], groups: list[int], drafts: torch.Tensor) -> torch.Tensor | None:
    """Drafts for the tree after a step that accepted `path`: (depth, ...) rows of
    `drafts` (groups, k, ...), pseudo states or their logits; None when there are none.

    The pseudo states of node a at position p draft the tokens at p+2..p+k+1. When the
    path's last node x (position p + s) has none, those of its deepest ancestor a with
    pseudo states still cover x's next tokens from depth s on: drafts[a][s:]. The root
    always has pseudo states (its score, 0, is the highest), so only a path deeper than
    k beyond its last drafted node ends with no drafts.
    """
    a = next(node for node in reversed(path) if node in groups)
    shift = tree.depths[path[-1]] - tree.depths[a]
    own = drafts[groups.index(a)]
    return own[shift:] if shift < own.shape[0] else None


class HiddenTransferDecoder:
    def __init__(
        self,
        model: Transformer,
        ht: PseudoStateDrafter,
        cache: KVCache,
        tree: HtConfig,
        lookup: PromptLookupDrafter | None = None,
    ):
        """`lookup`, when given, grafts its prompt-lookup chain onto every tree (mode ht-pld)."""
        depth = min(tree.depth or ht.config.k, ht.config.k)
        self.model, self.ht, self.cache, self.tree_config = model, ht.first(depth), cache, tree
        self.lookup = lookup

    def build_tree(self, root: int, drafts: torch.Tensor | None) -> TokenTree:
        logprobs = None if drafts is None else torch.log_softmax(drafts.float(), dim=-1)
        if logprobs is None:
            tree = root_only(root)
        elif self.tree_config.tree == "template":
            tree = build_template_tree(root, logprobs, DEFAULT_TEMPLATE[: self.tree_config.budget - 1])
        else:
            tree = build_dynamic_tree(root, logprobs, self.tree_config.budget, self.tree_config.top_k)
        if self.lookup is not None:
            tree = graft_chain(tree, self.lookup.drafts(root), logprobs)
        return tree

    def pseudo_groups(self, tree: TokenTree) -> list[int]:
        """Nodes that get pseudo states: the highest-scoring ones, in tree order."""
        best = sorted(range(len(tree)), key=lambda i: -tree.scores[i])[: self.tree_config.pseudo_nodes]
        return sorted(best)

    def prefill(self, prompt_ids: list[int], choose: Greedy | Sampler) -> tuple[int, float, torch.Tensor]:
        """Prompt into the cache; returns the first token, its margin and the first drafts."""
        n = len(prompt_ids)
        positions = torch.arange(n, device=self.model.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=self.model.device).tril()
        h, pseudo = transfer_forward(self.model, self.ht, self.cache, prompt_ids, positions, causal, [n - 1])
        self.cache.commit(n)
        token, margin = choose.choose(self.model.lm_head(h[-1]), 0)
        return token, margin, self.model.lm_head(pseudo[0])

    def step(
        self, tree: TokenTree, choose: Greedy | Sampler, index: int
    ) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Verify `tree`, whose first child is reply token `index`; returns committed tokens
        (accepted drafts + bonus), their margins and the drafts for the next tree (None
        when the path ended on a node without them)."""
        groups = self.pseudo_groups(tree)
        positions = self.cache.length + torch.tensor(tree.depths, device=self.model.device)
        h, pseudo = transfer_forward(
            self.model, self.ht, self.cache, tree.tokens, positions, tree.ancestor_mask(self.model.device), groups
        )
        # One LM head call for nodes and pseudo states: at these few rows its cost is
        # streaming the vocab x dim weight, so one call over all rows beats two smaller ones.
        n, (m, k, dim) = h.shape[0], pseudo.shape
        logits = self.model.lm_head(torch.cat((h, pseudo.reshape(m * k, dim))))
        path, tokens, margins = accept(tree, logits[:n], choose, index)
        self.cache.keep(path)
        if self.lookup is not None:
            self.lookup.observe(tree, path)
        return tokens, margins, next_drafts(tree, path, groups, logits[n:].reshape(m, k, -1))

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], choose: Greedy | Sampler
    ) -> Iterator[Step]:
        self.cache.truncate(0)
        if self.lookup is not None:
            self.lookup.start(prompt_ids)
        token, margin, drafts = self.prefill(prompt_ids, choose)
        produced = 1
        yield Step([token], [margin])
        if token in stop_ids or max_new_tokens == 1:
            return
        while True:
            tokens, margins, next_drafts = self.step(self.build_tree(token, drafts), choose, produced)
            tokens, margins, done = clip_step(tokens, margins, produced, max_new_tokens, stop_ids)
            produced += len(tokens)
            yield Step(tokens, margins)
            if done:
                return
            token, drafts = tokens[-1], next_drafts

"""Token Recycling (`token-recycling`): a train-free adjacency table of likely next tokens.

adjacency[x] (top_k tokens, -1 = unknown) holds the target's best next tokens the last
time it ran on token x. Every verification step refreshes the rows of all tree nodes'
tokens from the target's top-k after them, accepted or not (their outputs are "recycled").
A tree is grown breadth-first from the root along a fixed template of candidate ranks:
path (0, 1) is adjacency[root][0], then adjacency[that][1]. The table is kept across
requests, so it improves with use.
"""

from __future__ import annotations

import torch

from workers.tree import DEFAULT_TEMPLATE, TokenTree, root_only


class TokenRecyclingDrafter:
    def __init__(self, vocab_size: int, top_k: int, budget: int, template: list[tuple[int, ...]] = DEFAULT_TEMPLATE):
        ranks = 1 + max(max(p) for p in template)
        if top_k < ranks:
            raise ValueError(f"token recycling: top_k {top_k} is below the template's {ranks} candidate ranks")
        self.observed_top_k = top_k
        self.adjacency = torch.full((vocab_size, top_k), -1, dtype=torch.long)
        self.template = sorted(template[: budget - 1], key=len)

    def start(self, prompt_ids: list[int]) -> None:
        pass  # the table carries over between requests

    def propose(self, root: int) -> TokenTree:
        tree, index = root_only(root), {(): 0}
        rows: dict[int, list[int]] = {}
        for path in self.template:
            parent = index.get(path[:-1])
            if parent is None:  # the parent's candidate was unknown
                continue
            parent_token = tree.tokens[parent]
            if parent_token not in rows:
                rows[parent_token] = self.adjacency[parent_token].tolist()
            token = rows[parent_token][path[-1]]
            if token < 0:
                continue
            index[path] = len(tree)
            tree.tokens.append(token)
            tree.parents.append(parent)
            tree.depths.append(len(path))
            tree.scores.append(-float(sum(path)))  # no probabilities: better ranks score higher
        return tree

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor) -> None:
        self.adjacency[torch.tensor(tree.tokens)] = top_tokens[:, : self.observed_top_k].to(self.adjacency.device)

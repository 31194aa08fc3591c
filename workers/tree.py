"""Token trees of draft candidates, flattened in topological order.

Node 0 is the root: the token the target model already chose (the previous step's bonus
token), not yet in the KV cache. Each other node is a draft for the token after its
parent. A node's position is prefix_length + depth, and it may attend only to the cached
prefix, its ancestors and itself (`ancestor_mask`).

Drafts come as per-depth distributions, `draft_logprobs[d]` for the tokens at depth d+1,
that do not depend on the tokens chosen above them (hidden-transfer and Medusa drafts are
like that). A path's score is the sum of its tokens' log-probabilities.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workers.drafters.successor_prior import SuccessorPrior


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int]  # parent index per node; -1 for the root
    depths: list[int]
    scores: list[float]  # path log-probability under the drafts (root: 0)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                kids[parent].append(node)
        return kids

    def ancestor_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, n) bool: True where node i may attend to node j (j is i or an ancestor of i)."""
        n = len(self.tokens)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for node, parent in enumerate(self.parents):
            mask[node, node] = True
            if parent >= 0:  # parents come first, so their rows are complete
                mask[node] |= mask[parent]
        return mask.to(device)

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` holding `token` (the first, should two hold it), or None."""
        return next((c for c in range(node + 1, len(self.tokens)) if self.parents[c] == node and self.tokens[c] == token), None)

    def walk(self, tokens: list[int], node: int = 0) -> int | None:
        """The node reached from `node` by following `tokens` down the tree, or None when they leave it."""
        for token in tokens:
            node = self.child(node, token)
            if node is None:
                return None
        return node

    @classmethod
    def from_parents(cls, tokens: list[int], parents: list[int]) -> TokenTree:
        """A tree of unscored nodes from its flat form (the root first, every parent before its children)."""
        if not tokens or len(parents) != len(tokens) or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
            raise ValueError("a tree needs the root first and every parent before its child")
        depths = [0] * len(tokens)
        for i, p in enumerate(parents[1:], 1):
            depths[i] = depths[p] + 1
        return cls(list(tokens), list(parents), depths, [0.0] * len(tokens))

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def subtree(tree: TokenTree, node: int) -> TokenTree:
    """The nodes below `node` (and it, as the root), depths and scores counted from it."""
    order = [i for i in range(node, len(tree)) if node in tree.path_to(i)]
    index = {old: new for new, old in enumerate(order)}
    return TokenTree([tree.tokens[i] for i in order], [-1] + [index[tree.parents[i]] for i in order[1:]],
                     [tree.depths[i] - tree.depths[node] for i in order], [tree.scores[i] - tree.scores[node] for i in order])


def root_only(token: int) -> TokenTree:
    return TokenTree([token], [-1], [0], [0.0])


def chain(root: int, tokens: list[int]) -> TokenTree:
    """root -> tokens[0] -> tokens[1] -> ..., unscored."""
    n = len(tokens)
    return TokenTree([root, *tokens], list(range(-1, n)), list(range(n + 1)), [0.0] * (n + 1))


def build_dynamic_tree(root: int, draft_logprobs: torch.Tensor, budget: int, top_k: int,
                       prior: SuccessorPrior | None = None) -> TokenTree:
    """The `budget` nodes (root included) of highest path score, EAGLE-2 style.

    draft_logprobs: (max_depth, vocab) log-probabilities for depths 1..max_depth.
    Without `prior` every node at depth d - 1 has the same candidate children, the top_k
    drafts of depth d; with it (workers.drafters.successor_prior), each node's children
    are the drafts of depth d rescored under that node's own token.
    Best-first search: the frontier holds each node's next-best unexpanded child and its
    next sibling, so every pop is the best remaining node and the result is a valid tree.
    """
    depth_limit = draft_logprobs.shape[0]
    top = torch.topk(draft_logprobs.float(), min(top_k, draft_logprobs.shape[-1]), dim=-1)
    shared = list(zip(top.values.tolist(), top.indices.tolist()))  # by depth: (log p, tokens), best first
    if prior is not None:  # NumPy views for its per-node rescoring
        lp_np = draft_logprobs.float().cpu().numpy()
        top_np = list(zip(top.values.cpu().numpy(), top.indices.cpu().numpy()))

    def candidates(token: int, depth: int) -> tuple[list[float], list[int]]:  # the children of a node
        if prior is None:
            return shared[depth - 1]
        return prior.children(lp_np[depth - 1], top_np[depth - 1], token, depth, top_k)

    tree = root_only(root)
    children = {0: candidates(root, 1)} if depth_limit > 0 else {}  # node -> its candidate children
    # Heap entries: (-score, parent node, depth of the child, rank of the child among candidates).
    frontier: list[tuple[float, int, int, int]] = []
    if depth_limit > 0:
        frontier.append((-children[0][0][0], 0, 1, 0))
    while frontier and len(tree) < budget:
        neg_score, parent, depth, rank = heapq.heappop(frontier)
        cand_lp, cand_tok = children[parent]
        node = len(tree)
        tree.tokens.append(cand_tok[rank])
        tree.parents.append(parent)
        tree.depths.append(depth)
        tree.scores.append(-neg_score)
        parent_score = tree.scores[parent]
        if rank + 1 < len(cand_lp):  # the parent's next child
            heapq.heappush(frontier, (-(parent_score + cand_lp[rank + 1]), parent, depth, rank + 1))
        if depth < depth_limit:  # this node's best child
            children[node] = candidates(cand_tok[rank], depth + 1)
            heapq.heappush(frontier, (-(-neg_score + children[node][0][0]), node, depth + 1, 0))
    return tree


# A fixed tree of candidate-rank paths (token recycling's, workers.drafters.token_recycling:
# path (0, 1) is the best candidate's second-best successor), ordered so that every prefix
# of the list is itself a valid template: a budget of n nodes takes the first n - 1.
DEFAULT_TEMPLATE: list[tuple[int, ...]] = [
    (0,), (0, 0), (1,), (0, 0, 0), (0, 1), (2,), (1, 0), (0, 0, 0, 0), (0, 0, 1), (0, 1, 0), (3,),
    (0, 2), (2, 0), (1, 1), (0, 0, 0, 1), (0, 0, 2), (1, 0, 0), (0, 0, 1, 0), (4,), (0, 3), (0, 1, 1),
]


def graft_chain(tree: TokenTree, tokens: list[int], draft_logprobs: torch.Tensor | None, at: int = 0) -> TokenTree:
    """Add the path at -> tokens[0] -> tokens[1] ... to `tree` in place (from the root unless
    `at` names another node), reusing nodes that already hold the same tokens. A new node
    at depth d scores its parent's score plus the drafts' log-probability of its token at
    depth d, or -inf where the drafts stop (or there are none)."""
    node = at
    for token in tokens:
        match = tree.child(node, token)
        if match is None:
            depth = tree.depths[node] + 1
            known = draft_logprobs is not None and depth <= draft_logprobs.shape[0]
            gain = float(draft_logprobs[depth - 1, token]) if known else float("-inf")
            match = len(tree)
            tree.tokens.append(token)
            tree.parents.append(node)
            tree.depths.append(depth)
            tree.scores.append(tree.scores[node] + gain)
        node = match
    return tree

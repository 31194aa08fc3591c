"""The drafter worker's draft tree (mode `async` with a draft model): a draft model grows a
token tree below the last committed token while the target verifies, and keeps what the
commits confirm.

The draft model's KV cache holds

    [0, base)             the committed tokens (`committed`, the root last), causally
    [base, cache.length)  one row per expanded tree node, in expansion order; a row sees
                          the committed rows and its ancestors' rows only

A node's children come from its row's log-probabilities, the root's from the last
committed row. Every node carries its path's draft log-probability (`scores`).

    advance(keep, tokens)  the committed tokens are now committed[:keep] + tokens. When
                           they extend the root (keep == len(committed)) down a path of
                           the tree, that path's rows become committed rows
                           (KVCache.keep) and the subtree below the new root stays, its
                           rows moved down after them: the drafting done for the outcome
                           that came is kept. Otherwise what still holds stays committed
                           and the tree starts again at the new root.
    grow(calls)            one forward per call: first the committed tokens the cache
                           lacks (the root last: its children), then the `width` best
                           unexpanded nodes by path log-probability, each adding its
                           `width` best children; at most `max_rows` expanded rows
    tree()                 every node (the root first, parents before children), scored

Width 1 grows the draft model's greedy chain. The target verifies whatever is sent, so
any tree is lossless.
"""

from __future__ import annotations

import torch

from workers.drafters.draft_vocabulary import DraftVocabulary
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree import TokenTree


class GrowingDraftTree:
    def __init__(self, model: Transformer, cache: KVCache, width: int, max_rows: int, vocabulary: DraftVocabulary | None = None):
        if min(width, max_rows) < 1:
            raise ValueError(f"a draft tree needs width and max_rows >= 1, got {width}, {max_rows}")
        self.model, self.cache, self.width, self.max_rows = model, cache, width, max_rows
        self.vocabulary = vocabulary or DraftVocabulary(model, None)
        self.committed: list[int] = []
        self.base = 0  # committed tokens whose rows are in the cache (a prefix)
        cache.truncate(0)
        self._new_tree()

    def _new_tree(self) -> None:
        """Only the root (the last committed token), not yet expanded."""
        self.tokens = [self.committed[-1] if self.committed else -1]
        self.parents, self.depths, self.scores = [-1], [0], [0.0]
        self.rows: list[int | None] = [None]  # an expanded node's row after `base` (root: None, its row is committed)
        self.children: list[list[int]] = [[]]
        self.expanded = [False]
        self.cache.truncate(self.base)

    @property
    def tree_rows(self) -> int:
        return self.cache.length - self.base

    def child(self, node: int, token: int) -> int | None:
        return next((c for c in self.children[node] if self.tokens[c] == token), None)

    def advance(self, keep: int, tokens: list[int]) -> None:
        if keep > len(self.committed):
            raise ValueError(f"the drafter holds {len(self.committed)} committed tokens; {keep} cannot be kept")
        if keep < len(self.committed):  # another history: what still holds stays; the root is fed again
            self.committed = self.committed[:keep] + tokens
            self.base = max(min(self.base, keep, len(self.committed) - 1), 0)
            return self._new_tree()
        if not tokens:
            return
        path, node = [], 0
        for token in tokens:
            node = self.child(node, token)
            if node is None:
                break
            path.append(node)
        self.committed += tokens
        last = path[-1] if path else 0
        if len(path) == len(tokens) and self.expanded[last]:  # the tree holds the outcome: keep below it
            below = [x for x in range(last + 1, len(self.tokens)) if self._descends(x, last)]
            # Rows in expansion order (KVCache.keep's), which need not be the nodes' order.
            kept = [self.rows[n] for n in path] + sorted(self.rows[x] for x in below if self.expanded[x])
            self._keep_rows(kept, len(path))
            self._reroot(last, below, {r: i - len(path) for i, r in enumerate(kept)})
        else:  # the rows of the path's expanded nodes become committed; the rest is fed next
            self._keep_rows([self.rows[n] for n in path if self.expanded[n]], None)
            self._new_tree()

    def _descends(self, node: int, ancestor: int) -> bool:
        while node > ancestor:
            node = self.parents[node]
        return node == ancestor

    def _keep_rows(self, rows: list[int], committed: int | None) -> None:
        """Keep `rows` (increasing: ancestors expand first), the first `committed` of them
        (all, for None) as committed rows after `base`."""
        self.cache.truncate(self.base)
        self.cache.keep(rows)
        self.base += len(rows) if committed is None else committed

    def _reroot(self, root: int, below: list[int], moved: dict[int, int]) -> None:
        order = [root] + below  # parents before children (a child is made after its parent)
        index = {old: new for new, old in enumerate(order)}
        self.tokens = [self.tokens[i] for i in order]
        self.parents = [-1] + [index[self.parents[i]] for i in below]
        self.depths = [self.depths[i] - self.depths[root] for i in order]
        self.scores = [self.scores[i] - self.scores[root] for i in order]
        self.rows = [None] + [moved[self.rows[i]] if self.expanded[i] else None for i in below]
        self.expanded = [self.expanded[i] for i in order]
        self.children = [[index[c] for c in self.children[i]] for i in order]

    @torch.inference_mode()
    def grow(self, calls: int) -> int:
        """Up to `calls` forwards; returns how many ran (0: nothing left to grow)."""
        ran = 0
        for _ in range(calls):
            if self.base < len(self.committed):  # feed what the cache lacks: the root's children
                feed = self.committed[self.base:]
                positions = torch.arange(self.base, self.base + len(feed), device=self.model.device)
                logprobs = self._forward(feed, positions, None, prompt_rows=len(feed) - 1)[-1:]
                self.base = self.cache.length
                self._add_children([0], logprobs)
                ran += 1
                continue
            room = self.max_rows - self.tree_rows
            if room <= 0 or not self.expanded[0]:
                break
            open_nodes = [i for i in range(1, len(self.tokens)) if not self.expanded[i]]
            nodes = sorted(open_nodes, key=lambda i: (-self.scores[i], i))[: min(self.width, room)]
            if not nodes:
                break
            mask = torch.zeros(len(nodes), self.tree_rows, dtype=torch.bool)
            for r, node in enumerate(nodes):
                ancestor = self.parents[node]
                while ancestor > 0:
                    mask[r, self.rows[ancestor]] = True
                    ancestor = self.parents[ancestor]
            first = self.tree_rows
            positions = torch.tensor([self.base - 1 + self.depths[n] for n in nodes], device=self.model.device)
            logprobs = self._forward([self.tokens[n] for n in nodes], positions, mask.to(self.model.device))
            for r, node in enumerate(nodes):
                self.rows[node] = first + r
            self._add_children(nodes, logprobs)
            ran += 1
        return ran

    def _forward(self, tokens: list[int], positions: torch.Tensor, mask: torch.Tensor | None, prompt_rows: int = 0) -> torch.Tensor:
        """Run `tokens` into the cache as new rows; their draft log-probabilities (n, draft vocabulary). `mask`
        (n, tree rows): which tree rows each sees (None: causal rows after the committed ones)."""
        m = self.model
        own = torch.eye(len(tokens), dtype=torch.bool, device=m.device) if mask is not None else None
        ctx = m.context(positions, self.cache, own, prompt_rows=prompt_rows)
        if mask is not None:
            ctx.mask[:, self.base:self.cache.length] &= mask
        h = m.run_layers(m.embed(torch.tensor([tokens], device=m.device)), ctx)
        self.cache.commit(len(tokens))
        return self.vocabulary.logprobs(h[0])

    def _add_children(self, nodes: list[int], logprobs: torch.Tensor) -> None:
        for node, values, indices in zip(nodes, *self.vocabulary.top(logprobs, self.width)):
            self.expanded[node] = True
            for lp, token in zip(values, indices):
                self.children[node].append(len(self.tokens))
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
                self.scores.append(self.scores[node] + lp)
                self.rows.append(None)
                self.children.append([])
                self.expanded.append(False)

    def tree(self) -> TokenTree:
        return TokenTree(list(self.tokens), list(self.parents), list(self.depths), list(self.scores))

"""Prompt lookup (`pld`): drafts copied from the context after an earlier match of its last n-gram.

With the context c_0..c_T (prompt, committed tokens and the root), find the latest
earlier occurrence of its last n tokens, longest n first (max_ngram down to min_ngram),
and propose the `depth` tokens that followed it as a chain. No parameters, no training.
"""

from __future__ import annotations

import torch

from workers.tree import TokenTree, chain


def lookup(context: list[int], min_ngram: int, max_ngram: int, depth: int) -> list[int]:
    """Tokens that followed the latest earlier match of the context's last n-gram."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + depth]
    return []


class PromptLookupDrafter:
    observed_top_k = 1

    def __init__(self, min_ngram: int, max_ngram: int, depth: int):
        self.min_ngram, self.max_ngram, self.depth = min_ngram, max_ngram, depth
        self.context: list[int] = []

    def start(self, prompt_ids: list[int]) -> None:
        self.context = list(prompt_ids)

    def drafts(self, root: int) -> list[int]:
        """The tokens to propose after `root` (possibly none)."""
        return lookup(self.context + [root], self.min_ngram, self.max_ngram, self.depth)

    def propose(self, root: int) -> TokenTree:
        return chain(root, self.drafts(root))

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor | None = None) -> None:
        self.context += [tree.tokens[i] for i in path]  # the root and the accepted drafts

"""Prompt lookup (`pld`): drafts copied from the context after an earlier match of its last n-gram.

With the context c_0..c_T (prompt, committed tokens and the root), find the latest
earlier occurrence of its last n tokens, longest n first (max_ngram down to min_ngram),
and propose the `depth` tokens that followed it as a chain. No parameters, no training.
"""

from __future__ import annotations

import torch

from workers.tree import TokenTree, chain


def lookup(context: list[int], min_ngram: int, max_ngram: int, depth: int) -> list[int]:
    """Tokens that followed the latest earlier match of the context's last n-gram (a scan of
    the context: for one-off contexts, as the pipeline's launch trees build them; a drafter
    whose context grows asks its NgramIndex, which answers the same)."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + depth]
    return []


class NgramIndex:
    """`lookup`'s answer for a context that only grows, in a few dictionary reads instead of a
    scan of the context (0.7 us against 111 us a step at 500 tokens without a match): the
    latest start of every n-gram of the context, min_ngram <= n <= max_ngram."""

    def __init__(self, min_ngram: int, max_ngram: int):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start in tokens

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.latest[tuple(self.tokens[end - n :])] = end - n

    def after(self, root: int, depth: int) -> list[int]:
        """lookup(tokens + [root], min_ngram, max_ngram, depth): every earlier match of the
        last n-gram of tokens + [root] lies inside tokens, so the index holds the latest."""
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self.latest.get((*tokens[len(tokens) - n + 1 :], root) if n > 1 else (root,))
            if start is not None:
                follow = tokens[start + n : start + n + depth]
                if start + n + depth > len(tokens):  # the continuation runs into the root itself
                    follow.append(root)
                return follow
        return []


class PromptLookupDrafter:
    observed_top_k = 1

    def __init__(self, min_ngram: int, max_ngram: int, depth: int):
        self.min_ngram, self.max_ngram, self.depth = min_ngram, max_ngram, depth
        self.index = NgramIndex(min_ngram, max_ngram)

    @property
    def context(self) -> list[int]:
        """The prompt and the tokens committed since."""
        return self.index.tokens

    def start(self, prompt_ids: list[int]) -> None:
        self.index = NgramIndex(self.min_ngram, self.max_ngram)
        self.index.extend(prompt_ids)

    def drafts(self, root: int) -> list[int]:
        """The tokens to propose after `root` (possibly none)."""
        return self.index.after(root, self.depth)

    def propose(self, root: int) -> TokenTree:
        return chain(root, self.drafts(root))

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor | None = None) -> None:
        self.index.extend([tree.tokens[i] for i in path])  # the root and the accepted drafts

"""The narrow interface of drafters verified by runtime.decoding.tree_decoder.TreeDecoder.

A drafter sees the committed tokens and the target's outputs, and proposes a token tree
per step; it never changes what is committed, so any drafter is lossless.
"""

from __future__ import annotations

from typing import Protocol

import torch

from workers.tree import TokenTree


class Drafter(Protocol):
    # How many of the target's top tokens after each node `observe` wants (>= 1).
    observed_top_k: int

    def start(self, prompt_ids: list[int]) -> None:
        """A new request: the prompt is in the cache."""

    def propose(self, root: int) -> TokenTree:
        """A tree rooted at `root`, the committed token not yet in the cache."""

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor) -> None:
        """After verification: `path` (node indices, root first) was accepted, and
        top_tokens (n, observed_top_k) holds the target's best next tokens after each node."""


# A drafter that reads the target's features (workers.drafters.eagle) also has
#     feed(hidden)   hidden (m, dim): the last layer's hidden states, before the final norm,
#                    of the positions committed since the last call (the prompt after
#                    `start`, the accepted path after `observe`)
#     skip(root)     a plain step committed `root` with no proposal (runtime.decoding.tree_decoder,
#                    while other replies share the passes): what `feed` and `observe` bring
#                    next follows it, and the next `propose` catches up on all of it

"""Early-exit self-drafting: the target's first layers, its final norm and LM head draft a chain.

No new parameters: the drafter is the model cut after `layer` layers (the predictor that
predictive pipelined decoding uses). `early_exit_chain` is written once for its two
users: mode `early-exit` (EarlyExitDrafter, below) and the asynchronous drafter of the
pipeline (workers.decode_worker.DecodeWorker.draft). It feeds tokens through layers
[0, layer) into the cache, as if committed, and takes argmax lm_head(norm(h)) of the
last one as the next token, one position at a time.

EarlyExitDrafter drafts `depth` tokens from the root this way and then truncates the
cache back, so the verifying forward pass overwrites those entries.
"""

from __future__ import annotations

import torch

from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree import TokenTree, chain


def early_exit_chain(model: Transformer, cache: KVCache, feed: list[int], n: int, layer: int) -> list[int]:
    """Commit `feed` (layers [0, layer) only) and draft n tokens after it, each committed in
    turn so the next draft attends to it; returns the drafts."""
    drafted = []
    for _ in range(n):
        positions = torch.arange(cache.length, cache.length + len(feed), device=model.device)
        h = model.run_layers(model.embed(torch.tensor([feed], device=model.device)), model.context(positions, cache), 0, layer)
        cache.commit(len(feed))
        feed = [int(model.lm_head(model.norm(h[0, -1])).argmax())]
        drafted.append(feed[0])
    return drafted


class EarlyExitDrafter:
    observed_top_k = 1

    def __init__(self, model: Transformer, cache: KVCache, layer: int, depth: int):
        if not 1 <= layer <= model.args.n_layers:
            raise ValueError(f"early-exit layer must be in 1..{model.args.n_layers}, got {layer}")
        self.model, self.cache, self.layer, self.depth = model, cache, layer, depth

    def start(self, prompt_ids: list[int]) -> None:
        pass  # nothing is kept between requests

    def propose(self, root: int) -> TokenTree:
        committed = self.cache.length
        drafts = early_exit_chain(self.model, self.cache, [root], self.depth, self.layer)
        self.cache.truncate(committed)
        return chain(root, drafts)

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor) -> None:
        pass  # the drafts come from the model itself

"""Early-exit self-drafting: the target's first layers, its final norm and LM head draft a chain.

No new parameters: the drafter is the model cut after `layer` layers (the predictor that
predictive pipelined decoding uses). From the root token, each draft runs one position
through layers [0, layer) with the committed cache and takes the argmax of
lm_head(norm(h)); `depth` drafts form a chain. The drafted positions' K/V of those
layers are written into the cache as if committed and then truncated away, so the
verifying forward pass overwrites them.
"""

from __future__ import annotations

import torch

from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree import TokenTree


class EarlyExitDrafter:
    observed_top_k = 1

    def __init__(self, model: Transformer, cache: KVCache, layer: int, depth: int):
        if not 1 <= layer <= model.args.n_layers:
            raise ValueError(f"early-exit layer must be in 1..{model.args.n_layers}, got {layer}")
        self.model, self.cache, self.layer, self.depth = model, cache, layer, depth

    def start(self, prompt_ids: list[int]) -> None:
        pass  # nothing is kept between requests

    def propose(self, root: int) -> TokenTree:
        model, cache = self.model, self.cache
        committed, token, chain = cache.length, root, []
        for _ in range(self.depth):
            tokens = torch.tensor([[token]], device=model.device)
            positions = torch.tensor([cache.length], device=model.device)
            h = model.run_layers(model.embed(tokens), model.context(positions, cache), 0, self.layer)
            cache.commit(1)  # the next draft attends to this one
            token = int(model.lm_head(model.norm(h[0, -1])).argmax())
            chain.append(token)
        cache.truncate(committed)
        n = len(chain) + 1
        return TokenTree([root, *chain], list(range(-1, n - 1)), list(range(n)), [0.0] * n)

    def observe(self, tree: TokenTree, path: list[int], top_tokens: torch.Tensor) -> None:
        pass  # the drafts come from the model itself

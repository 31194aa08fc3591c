"""PaSS look-ahead embeddings: k learned input embeddings appended after the last token.

PaSS (Monea et al., 2023) drafts by feeding k extra "look-ahead" input embeddings
e_1..e_k at positions t+1..t+k; the whole model runs over them with the real tokens,
e_j attending to the context and to e_<j, and the LM head reads from e_j's output a
draft of the token at t+j+1. Only k * dim parameters are learned. In the pseudo-state
family (workers.drafters.pseudo_states) it is the layer-0 member whose pseudo states do
not depend on h.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.drafters.pseudo_states import PseudoStateConfig, PseudoStateDrafter


class LookaheadEmbeddings(PseudoStateDrafter):
    def __init__(self, config: PseudoStateConfig, dim: int):
        super().__init__(config)
        # Small random start: equal embeddings would give every look-ahead position the same draft.
        self.embeddings = nn.Parameter(0.02 * torch.randn(config.k, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.embeddings.expand(*h.shape[:-1], *self.embeddings.shape)

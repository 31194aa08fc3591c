"""Medusa-1 heads: k residual blocks on the last hidden state, read by the frozen LM head.

Head j turns the hidden state h after the last layer (position t) into
h + SiLU(W_j h + b_j), and the final norm and the model's own LM head read from it a
draft of the token at t+j+1. Medusa-1 as published also gives each head a trainable copy
of the LM head (vocab x dim each); sharing the frozen one keeps the drafter at
k * (dim^2 + dim) parameters like the other pseudo-state drafters
(workers.drafters.pseudo_states), where it is the layer-N member of the family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.drafters.pseudo_states import PseudoStateConfig, PseudoStateDrafter


class MedusaHeads(PseudoStateDrafter):
    def __init__(self, config: PseudoStateConfig, dim: int):
        super().__init__(config)
        # Zero start, as in Medusa: every head begins by predicting what the LM head does.
        self.weight = nn.Parameter(torch.zeros(config.k, dim, dim))
        self.bias = nn.Parameter(torch.zeros(config.k, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.weight.dtype).unsqueeze(-2)  # (..., 1, dim)
        return h + F.silu(torch.einsum("...qd,ked->...ke", h, self.weight) + self.bias)

"""Hidden transfer: learned linear maps from one hidden state to k pseudo hidden states.

After `layer` decoder layers (0 < layer < N), the hidden state h of the last accepted
token (position t) is mapped by W_1..W_k to pseudo states W_j h for positions t+1..t+k.
They join the sequence there and run through the remaining layers with the real tokens;
the LM head then reads from pseudo state j a draft of the token at t+j+1
(workers.drafters.pseudo_states describes the family; workers.drafters.pseudo_forward runs it).
With `refine_layers`, maps U_ij at each later layer R_i add U_ij h_(R_i) to pseudo state j.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.drafters.pseudo_states import PseudoStateConfig, PseudoStateDrafter


class HiddenTransfer(PseudoStateDrafter):
    def __init__(self, config: PseudoStateConfig, dim: int):
        super().__init__(config)
        # (k, dim, dim); identity start: each pseudo state begins as a copy of h.
        self.transfer = nn.Parameter(torch.eye(dim).repeat(config.k, 1, 1))
        if config.refine_layers:
            # (k, refine layers, dim, dim); zero start: refinement begins as a no-op.
            self.refine_maps = nn.Parameter(torch.zeros(config.k, len(config.refine_layers), dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...d,ked->...ke", h.to(self.transfer.dtype), self.transfer)

    def refine(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h (..., dim) at refine layer i -> the additions to the pseudo states (..., k, dim)."""
        return torch.einsum("...d,ked->...ke", h.to(self.refine_maps.dtype), self.refine_maps[:, i])

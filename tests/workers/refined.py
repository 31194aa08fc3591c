"""A hidden-transfer drafter with random refine maps (FIRP style; the trained ones start at
zero, a no-op), for tests that need pseudo states that change from layer to layer."""

import dataclasses

import torch

from workers.drafters.hidden_transfer import HiddenTransfer


def with_refinement(ht: HiddenTransfer, layers, scale: float = 0.05, seed: int = 0) -> HiddenTransfer:
    """`ht`'s maps, with random refine maps at `layers`."""
    config = dataclasses.replace(ht.config, refine_layers=tuple(layers))
    out = HiddenTransfer(config, ht.transfer.shape[-1])
    missing, unexpected = out.load_state_dict(ht.state_dict(), strict=False)
    assert set(missing) == {"refine_maps"} and not unexpected
    g = torch.Generator().manual_seed(seed)
    out.refine_maps.data = torch.randn(out.refine_maps.shape, generator=g) * scale
    return out

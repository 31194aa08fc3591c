"""A hidden-transfer drafter with adapters whose up maps are random (the trained ones start
at zero, a no-op), for tests that need adapters that change the drafts."""

import dataclasses

import torch

from workers.drafters.hidden_transfer import HiddenTransfer


def with_adapters(ht: HiddenTransfer, layers, rank: int, scale: float = 1.0, seed: int = 0) -> HiddenTransfer:
    """`ht`'s maps, with adapters of `rank` before `layers`."""
    config = dataclasses.replace(ht.config, adapter_layers=tuple(layers), adapter_rank=rank)
    out = HiddenTransfer(config, ht.transfer.shape[-1])
    missing, unexpected = out.load_state_dict(ht.state_dict(), strict=False)
    assert set(missing) == {"adapter_down", "adapter_up"} and not unexpected
    g = torch.Generator().manual_seed(seed)
    out.adapter_down.data = torch.randn(out.adapter_down.shape, generator=g) * out.adapter_down.shape[-1] ** -0.5
    out.adapter_up.data = torch.randn(out.adapter_up.shape, generator=g) * scale
    return out

"""The pseudo-state forward: decoder layers over real rows, with k pseudo states per
drafting row joining at the drafter's layer (workers.drafters.pseudo_states).

It is written once, as layer-stepping code that yields between layers, and serves
everyone who runs pseudo states:

    the decoder (workers.tree_step)        runs it to the end
    the pipeline's worker                   stops at a yield when its step is aborted, and
      (workers.decode_worker)               reads the node states there to predict its walk
    training (runtime.training.objective)   runs it from the drafter's layer on, with
                                            gradients, over pseudo states alone

With n real rows h (1, n, dim) and m drafting rows ("anchors"):

  layers [start, L)   the n rows, with `node_ctx`
  layer L             the drafter maps the anchors' states (m, dim) to m*k pseudo states,
                      appended after the n rows; from here every row runs with `joined_ctx`
  layer R_i           (refine layers) each pseudo state gets drafter.refine(i, anchors)
  layers [L, N)       the n rows and the m*k pseudo states together

`anchors(layer, h)` gives the anchors' states at `layer`: rows of h during decoding,
states kept from an earlier pass in training. Real rows never attend to pseudo states
(`pseudo_mask`), so their results are exactly what a forward without them gives.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.model import AttentionContext, Transformer

Anchors = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, h) -> (m, dim)
LayerSteps = Generator[tuple[int, torch.Tensor], None, torch.Tensor]  # yields (layer, h); returns h


def pseudo_mask(node_mask: torch.Tensor, groups: list[int], k: int, pseudo_attention: bool) -> torch.Tensor:
    """Mask over [nodes | pseudo states] for n nodes plus k pseudo states per node in `groups`.

    Pseudo state (x, j) sees what node x sees, x itself, and pseudo states (x, < j) when
    `pseudo_attention`; nodes never see pseudo states.
    """
    n, m = node_mask.shape[0], len(groups)
    full = torch.zeros(n + m * k, n + m * k, dtype=torch.bool, device=node_mask.device)
    full[:n, :n] = node_mask
    full[n:, :n] = node_mask[groups].repeat_interleave(k, dim=0)
    full[n:, n:] = torch.block_diag(*[pseudo_block(k, pseudo_attention)] * m).to(node_mask.device)
    return full


def pseudo_block(k: int, pseudo_attention: bool) -> torch.Tensor:
    """(k, k) bool: what the k pseudo states of one anchor see of each other."""
    return torch.ones(k, k, dtype=torch.bool).tril() if pseudo_attention else torch.eye(k, dtype=torch.bool)


def pseudo_positions(anchor_positions: torch.Tensor, k: int) -> torch.Tensor:
    """(m,) anchor positions -> (m*k,): pseudo state j of an anchor at p sits at p + j (j = 1..k)."""
    return (anchor_positions[:, None] + torch.arange(1, k + 1, device=anchor_positions.device)).reshape(-1)


class SameRows:
    """The rows of a forward without pseudo states: the same rows and context at every layer."""

    def __init__(self, ctx: AttentionContext):
        self.ctx = ctx
        self.join_layers: frozenset[int] = frozenset()  # the layers before which `before` changes the rows

    def before(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, AttentionContext]:
        return h, self.ctx


class PseudoRows:
    """The rows of the pseudo-state forward (the module's docstring): before the drafter's layer
    L the n real rows with `node_ctx`; there the m*k pseudo states join and every row runs
    with `joined_ctx`; before each refine layer the pseudo states get their refinement."""

    def __init__(self, drafter: PseudoStateDrafter, node_ctx: AttentionContext | None, joined_ctx: AttentionContext,
                 anchors: Anchors, n: int):
        self.drafter, self.node_ctx, self.joined_ctx, self.anchors, self.n = drafter, node_ctx, joined_ctx, anchors, n
        self.refine = {r: i for i, r in enumerate(drafter.config.refine_layers)}
        self.join_layers = frozenset({drafter.config.layer, *self.refine})

    def before(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, AttentionContext]:
        """h (1, rows, dim), the state after `layer` layers -> the rows layer `layer` runs, and its context."""
        if layer == self.drafter.config.layer:  # the pseudo states join
            pseudo = self.drafter(self.anchors(layer, h)).reshape(1, -1, h.shape[-1])  # (1, m*k, dim)
            h = torch.cat((h, pseudo.to(h.dtype)), dim=1)
        if layer in self.refine:  # a later transfer (FIRP style) from the anchors' states here
            extra = self.drafter.refine(self.refine[layer], self.anchors(layer, h)).reshape(1, -1, h.shape[-1])
            h = torch.cat((h[:, : self.n], h[:, self.n :] + extra.to(h.dtype)), dim=1)
        return h, self.joined_ctx if layer >= self.drafter.config.layer else self.node_ctx


RowPlan = SameRows | PseudoRows


def planned_layers(model: Transformer, h: torch.Tensor, rows: RowPlan, start: int = 0) -> LayerSteps:
    """Layers [start, N) over h (1, n, dim), each over the rows and context `rows` gives it.
    Yields (layer, h) before every layer runs and once after the last (layer N), h being
    the state after `layer` layers; returns the final h, before the final norm.
    (workers.batched_step runs the same plans for several sequences in one pass.)"""
    n_layers = model.args.n_layers
    for layer in range(start, n_layers + 1):
        h, ctx = rows.before(layer, h)
        yield layer, h
        if layer < n_layers:
            h = model.layer(layer, h, ctx)
    return h


def layers(model: Transformer, h: torch.Tensor, ctx: AttentionContext, start: int = 0) -> LayerSteps:
    """Layers [start, N) over h: `planned_layers` without pseudo states."""
    return planned_layers(model, h, SameRows(ctx), start)


def pseudo_state_layers(
    model: Transformer,
    drafter: PseudoStateDrafter,
    h: torch.Tensor,
    node_ctx: AttentionContext | None,
    joined_ctx: AttentionContext,
    anchors: Anchors,
    start: int = 0,
) -> LayerSteps:
    """Run layers [start, N) over h (1, n, dim) with the drafter's pseudo states joining at
    its layer L (start <= L): `planned_layers` with PseudoRows; the final h is
    (1, n + m*k, dim)."""
    return planned_layers(model, h, PseudoRows(drafter, node_ctx, joined_ctx, anchors, h.shape[1]), start)


def run_to_end(steps: Generator):
    """Drive a layer-stepping generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value

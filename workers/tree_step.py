"""One decoding step: a token tree verified, and the next one drafted, in one forward pass.

Every decoding mode but `ar` is a loop of these steps (runtime.decoding, and the
pipeline's workers, workers.decode_worker). With P positions committed in the cache:

  rows        [catch-up | tree nodes | pseudo states]
    catch-up  c committed tokens the cache lacks, causal (the prompt on a first step;
              on a pipeline worker, what other workers committed meanwhile)
    nodes     the n tree nodes, rooted at the last committed token: each sees the
              catch-up rows and its ancestors, at position P + c + depth
    pseudo    k per node in `groups`, joining at the drafter's layer
              (workers.drafters.pseudo_forward); none without a drafter
  LM head     one call over the nodes and pseudo states
  accept      walk down from the root with the target's choices (`accept`)
  KV          the catch-up rows and the accepted path are kept, compacted in place
  drafts      the pseudo logits that cover the tokens after the path (`next_drafts`)

`tree_step` yields (layer, h) between layers, as the pseudo-state forward does, so a
caller may stop it (abort) or read it (predict); `run_to_end` runs it whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.batched_step import Segment, SharedPass, batched_forward, one_token
from workers.drafters.pseudo_forward import LayerSteps, PseudoRows, SameRows, planned_layers, pseudo_mask, pseudo_positions
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.sampling import Chooser
from workers.tree import TokenTree

# Cache slots beyond max_context for the pending positions of a tree step (catch-up is
# committed context; nodes and pseudo states are written before acceptance trims them).
TREE_HEADROOM = 512


def decoding_cache(model: Transformer, max_context: int) -> KVCache:
    """A KV cache for prompt + reply up to max_context positions, plus one step's pending rows."""
    return model.new_cache(max_context + TREE_HEADROOM)


@dataclass
class StepOutcome:
    path: list[int]  # accepted node indices, root first
    tokens: list[int]  # committed: the path's drafts, then the bonus token
    margins: list[float]  # of each choice (workers.sampling)
    logits: torch.Tensor  # (n, vocab) the target's after every node
    hidden: torch.Tensor  # (n, dim) the last layer's hidden state at every node, before the final norm
    drafts: torch.Tensor | None  # (depth, vocab) pseudo logits for the next tree; None: none cover it
    draft_states: torch.Tensor | None = None  # (depth, dim) the pseudo states behind `drafts`, before the final norm
    catch_up_hidden: torch.Tensor | None = None  # (c, dim) the catch-up rows' last-layer states; None without catch-up


def step_mask(catch_up: int, tree: TokenTree, device: torch.device | str = "cpu") -> torch.Tensor:
    """(c + n, c + n) bool: catch-up tokens causal; tree nodes see them all and their ancestors."""
    c, n = catch_up, len(tree)
    mask = torch.zeros(c + n, c + n, dtype=torch.bool)
    mask[:c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
    mask[c:, :c] = True
    mask[c:, c:] = tree.ancestor_mask()
    return mask.to(device)


def accept(tree: TokenTree, logits: torch.Tensor, choose: Chooser, index: int) -> tuple[list[int], list[int], list[float]]:
    """Walk the tree from the root with the target's choices.

    logits (n, vocab) are the target's after every node; the choice after the node at
    depth d is reply token index + d. Returns the path (node indices, root first), the
    committed tokens (the path's drafts, then the bonus token) and their margins.
    """
    path, tokens, margins = [0], [], []
    while True:
        token, margin = choose.choose(logits[path[-1]], index + len(tokens))
        tokens.append(token)
        margins.append(margin)
        child = tree.child(path[-1], token)
        if child is None:
            return path, tokens, margins
        path.append(child)


def next_drafts(tree: TokenTree, path: list[int], groups: list[int], drafts: torch.Tensor) -> torch.Tensor | None:
    """Drafts for the tree after a step that accepted `path`: (depth, ...) rows of
    `drafts` (groups, k, ...), pseudo states or their logits; None when there are none.

    The pseudo states of node a at position p draft the tokens at p+2..p+k+1. When the
    path's last node x (position p + s) has none, those of its deepest ancestor a with
    pseudo states still cover x's next tokens from depth s on: drafts[a][s:]. The root
    always has pseudo states (its score, 0, is the highest), so only a path deeper than
    k beyond its last drafted node ends with no drafts.
    """
    a = next(node for node in reversed(path) if node in groups)
    shift = tree.depths[path[-1]] - tree.depths[a]
    own = drafts[groups.index(a)]
    return own[shift:] if shift < own.shape[0] else None


def prompt_rows_of(catch_up: int, index: int) -> int:
    """How many leading catch-up rows are prompt positions (AttentionContext.prompt_rows). The
    root is the last committed token, at prompt length - 1 + index (index: the reply index of
    its first child), so the catch-up rows before prompt length - 1 are the first catch_up - index."""
    return max(catch_up - index, 0)


@dataclass
class PreparedStep:
    """A tree step ready to run: its rows as a Segment (workers.batched_step), and what
    `finish` needs to accept its tree once the forward has run, alone (`tree_step`) or in a
    pass with other sequences' rows (runtime.batching.step_batcher.StepBatcher)."""

    segment: Segment
    tree: TokenTree
    choose: Chooser
    index: int
    groups: list[int]
    k: int  # pseudo states per group

    def finish(self, h: torch.Tensor, logits: torch.Tensor) -> StepOutcome:
        """h (1, c + n + m*k, dim): the final state of the segment's rows; logits those of rows c on."""
        c, n, tree = self.segment.head_from, len(self.tree), self.tree
        path, tokens, margins = accept(tree, logits[:n], self.choose, self.index)
        self.segment.cache.keep(list(range(c)) + [c + node for node in path])
        groups, catch_up = self.groups, h[0, :c] if c else None
        if not groups:
            return StepOutcome(path, tokens, margins, logits[:n], h[0, c : c + n], None, None, catch_up)
        drafts = next_drafts(tree, path, groups, logits[n:].reshape(len(groups), self.k, -1))
        states = next_drafts(tree, path, groups, h[0, c + n :].reshape(len(groups), self.k, -1))
        return StepOutcome(path, tokens, margins, logits[:n], h[0, c : c + n], drafts, states, catch_up)


def prepare_tree_step(
    model: Transformer,
    cache: KVCache,
    tree: TokenTree,
    choose: Chooser,
    index: int,
    catch_up: list[int] = (),
    drafter: PseudoStateDrafter | None = None,
    groups: list[int] = (),
) -> PreparedStep:
    """`tree_step`'s rows, positions, masks and pseudo-state plan, before any layer runs."""
    c, device = len(catch_up), model.device
    groups = list(groups) if drafter is not None else []
    if c == 0 and len(tree) == 1 and not groups:  # a root alone: a one-token step, without a mask to build
        return PreparedStep(one_token(model, cache, tree.tokens[0]), tree, choose, index, [], 0)
    prompt = prompt_rows_of(c, index)
    positions = cache.length + torch.cat((torch.arange(c), c + torch.tensor(tree.depths))).to(device)
    node_mask = step_mask(c, tree, device)
    h = model.embed(torch.tensor([list(catch_up) + tree.tokens], device=device))
    node_ctx = model.context(positions, cache, node_mask, prompt)
    k = drafter.config.k if groups else 0
    if groups:
        anchor_rows = [c + g for g in groups]
        joined = model.context(
            torch.cat((positions, pseudo_positions(positions[anchor_rows], k))), cache,
            pseudo_mask(node_mask, anchor_rows, k, drafter.config.pseudo_attention), prompt,
        )
        rows = PseudoRows(drafter, node_ctx, joined, lambda layer, h: h[0, anchor_rows], h.shape[1])
    else:
        rows = SameRows(node_ctx)
    return PreparedStep(Segment(h, rows, cache, head_from=c, prompt_rows=prompt), tree, choose, index, groups, k)


def tree_step(
    model: Transformer,
    cache: KVCache,
    tree: TokenTree,
    choose: Chooser,
    index: int,
    catch_up: list[int] = (),
    drafter: PseudoStateDrafter | None = None,
    groups: list[int] = (),
) -> LayerSteps:
    """Verify `tree` (its first child is reply token `index`) after the `catch_up` tokens,
    with pseudo states for the nodes in `groups` when a drafter is given. Yields (layer, h)
    between layers; returns the StepOutcome, with the cache holding catch-up + path."""
    step = prepare_tree_step(model, cache, tree, choose, index, catch_up, drafter, groups)
    seg = step.segment
    h = yield from planned_layers(model, seg.h, seg.rows)
    # One LM head call for nodes and pseudo states: at these few rows its cost is
    # streaming the vocab x dim weight, so one call over all rows beats two smaller ones.
    logits = model.lm_head(model.norm(h[0, seg.head_from :]))  # (n + m*k, vocab)
    return step.finish(h, logits)


def verify(model: Transformer, step: PreparedStep, lane: SharedPass | None = None, expected_tokens: float = 1.0,
           rows: float | None = None) -> StepOutcome:
    """Run a prepared step and accept its tree: alone, or through `lane` in one pass with the
    steps of other replies decoding at once (runtime.batching; `expected_tokens` and
    `rows` tell them what it adds to the pass). The same outcome either way."""
    if lane is None:
        h, logits = batched_forward(model, [step.segment])[0]
    else:
        h, logits = lane.forward(step.segment, expected_tokens, rows)
    return step.finish(h, logits)

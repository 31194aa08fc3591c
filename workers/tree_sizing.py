"""Trees sized by their cost: each step keeps the part of its candidate tree that maximises
expected committed tokens per millisecond on this device.

A tree step commits 1 + (accepted drafts) tokens and costs t(rows), where rows counts the
tree's nodes plus the pseudo-state rows a drafter adds. A node's draft is committed only
when its whole path is, so the expected accepted drafts of a tree is the sum, over its
drafted nodes, of the probability p(node) that the target accepts the path down to it.
When p never rises from a parent to its child, the m most likely nodes always form a tree,
and the best tree of any size is such a prefix. `best_size` picks the m that maximises

    (1 + sum of the m largest p) / t(1 + m + extra rows)

on the device's measured step cost (`StepCost`, from `leapfrog profile`; Sequoia-style,
but per step and on this device's own curve). On a GPU t is nearly flat and the whole
candidate tree is kept; on two CPU cores a row past the fourth costs ~14% of a decode step
and small trees win.

p comes from what the drafts say, corrected by what the target did (`Acceptance`):
- a drafter's scored node (hidden transfer, Medusa, PaSS): its path probability under the
  drafts, times a per-depth calibration, hits / (sum of the offered nodes' draft
  probabilities) over the steps seen so far;
- an unscored node (a prompt-lookup chain, a token-recycling template): the product down
  its path of per-slot rates, P(slot accepted | its parent accepted), counted the same way
  (a slot is the node's depth in a chain, its index in a fixed tree, its rank among the
  recycled successors of its parent); under a scored parent, the parent's p times the rate.
Calibrations start at 1, slot rates at one accepted node in two; both only shape the tree: which
tokens are committed is the target's choice, so sizing never changes the output.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

from workers.model import ModelArgs
from workers.tree import TokenTree


@dataclass(frozen=True)
class Load:
    """What other requests' steps add to a batched pass this step joins
    (workers.batched_step): their rows, the tokens they are expected to commit, the
    pass's measured cost by its rows (None: not measured yet; the device's t(n) then), and
    what this reply's host work adds to the pass when it takes a tree step rather than a
    one-row one (ms). A node is worth its row when it adds more tokens per ms to the whole
    pass, so trees shrink as the batch grows, down to one-row steps (load-aware
    speculation); Load() is a step alone."""

    rows: float = 0.0
    tokens: float = 0.0
    cost: Callable[[float], float] | None = None
    tree_host_ms: float = 0.0


@dataclass(frozen=True)
class StepCost:
    """t(n): ms of one tree step of n rows, linear between measured row counts (and beyond the last)."""

    rows: tuple[int, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.rows) < 2 or len(self.rows) != len(self.ms) or list(self.rows) != sorted(set(self.rows)):
            raise ValueError(f"a step cost needs two or more increasing row counts with a time each: {self}")
        if min(self.ms) <= 0 or not all(map(math.isfinite, self.ms)):
            raise ValueError(f"step times must be positive and finite: {self.ms}")

    def __call__(self, n: float) -> float:
        i = min(max(bisect.bisect_left(self.rows, n), 1), len(self.rows) - 1)
        (n0, n1), (t0, t1) = self.rows[i - 1 : i + 1], self.ms[i - 1 : i + 1]
        return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), min(self.ms) / 2)


@dataclass(frozen=True)
class CostCurve:
    """t(n) at several context lengths (a `leapfrog profile`); `at` picks the nearest one."""

    by_context: dict[int, StepCost]

    def at(self, context: int) -> StepCost:
        return self.by_context[min(self.by_context, key=lambda c: (abs(c - context), c))]

    @classmethod
    def from_profile(cls, profile: dict) -> CostCurve:
        """From the JSON of workers.cost_curve (keys may be strings, as JSON writes them): its
        minimum times ("ms_min"; a busy machine only adds time), else its medians (a profile
        written by hand), each context's made non-decreasing in n (a time is lowered to the
        least time measured at any larger n: a step of fewer rows costs no more)."""
        try:
            table = profile["ms_min"] if "ms_min" in profile else profile["ms_median"]
            by_context = {int(c): envelope({int(n): float(t) for n, t in times.items()}) for c, times in table.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a step-cost profile (leapfrog profile): {e}") from None
        if not by_context:
            raise ValueError("the profile has no context lengths")
        return cls(by_context)


def envelope(times: dict[int, float]) -> StepCost:
    """t(n) from measured times by row count, each lowered to the least time at any larger n."""
    rows = sorted(times)
    ms = [times[n] for n in rows]
    for i in range(len(ms) - 2, -1, -1):
        ms[i] = min(ms[i], ms[i + 1])
    return StepCost(tuple(rows), tuple(ms))


def best_size(probs: list[float], cost: StepCost, extra_rows: float = 0.0, load: Load = Load()) -> int:
    """How many of the drafted nodes to keep: the m maximising (1 + sum of the m largest of
    `probs` + load.tokens) / (cost(1 + m + extra_rows + load.rows) + host), the tokens per
    ms of the whole pass the step shares with `load`; host is load.tree_host_ms unless the
    step is one row (m = 0 and no extra rows). The smallest such m on ties."""
    ranked = sorted(probs, reverse=True)
    cost = load.cost or cost
    host = load.tree_host_ms
    expected = 1.0 + load.tokens
    best_m, best_rate = 0, expected / (cost(1 + extra_rows + load.rows) + (host if extra_rows else 0.0))
    extra_rows += load.rows
    for m, p in enumerate(ranked, 1):
        expected += p
        rate = expected / (cost(1 + m + extra_rows) + host)
        if rate > best_rate * (1 + 1e-9):
            best_m, best_rate = m, rate
    return best_m


def monotone(tree: TokenTree, probs: list[float]) -> list[float]:
    """probs capped so that no node is more likely than its parent (parents come first)."""
    out = list(probs)
    for node, parent in enumerate(tree.parents):
        if parent >= 0:
            out[node] = min(out[node], out[parent])
    return out


def keep_most_likely(tree: TokenTree, probs: list[float], m: int, first: frozenset[int] = frozenset()) -> tuple[TokenTree, list[int]]:
    """The root and the m drafted nodes of highest `probs` (monotone: they form a tree), the
    nodes in `first` before any other, in the tree's order; also the kept nodes' indices in `tree`."""
    ranked = sorted(range(1, len(tree)), key=lambda i: (i not in first, -probs[i], i))[:m]
    kept = [0, *sorted(ranked)]
    index = {old: new for new, old in enumerate(kept)}
    parents = [-1] + [index[tree.parents[i]] for i in kept[1:]]
    pruned = TokenTree([tree.tokens[i] for i in kept], parents, [tree.depths[i] for i in kept], [tree.scores[i] for i in kept])
    return pruned, kept


@dataclass
class Rate:
    hits: float
    trials: float

    @property
    def value(self) -> float:
        return self.hits / self.trials

    def add(self, hits: float, trials: float) -> None:
        self.hits, self.trials = self.hits + hits, self.trials + trials

    def forget(self, prior: Rate, keep: float) -> None:
        """Move `1 - keep` of the way back to the prior's counts."""
        self.hits = prior.hits + keep * (self.hits - prior.hits)
        self.trials = prior.trials + keep * (self.trials - prior.trials)


CALIBRATION_PRIOR = Rate(1.0, 1.0)  # draft probabilities taken as they are until steps say otherwise


def depth_prior(depth: int) -> Rate:
    # Accepted drafts per step at this depth until steps say otherwise: 1/2, 1/8, 1/32, ...
    # (each depth far less likely than the one above, as with every drafter measured here).
    return Rate(0.5 * 0.25 ** (depth - 1), 1.0)
SLOT_PRIOR = Rate(1.0, 2.0)  # one accepted node in two
# Every step, each estimate forgets 2% of what it learnt (a memory of ~50 steps): it follows
# the text, and a node that stopped paying is tried again now and then, since a node that
# is never offered teaches nothing.
KEEP = 0.98


@dataclass
class Acceptance:
    """How likely the target is to accept each node of a tree, learnt from the steps seen.

    `scale[d]`: the calibration of draft path probabilities at depth d; `slots[s]`: per-slot
    rates of unscored nodes, conditional on the parent's acceptance (see the module's
    docstring); `per_step[d]`: drafted tokens accepted at depth d per step that had drafts
    that deep (what drafting to depth d is worth: `TreeSizer.draft_depth`).
    """

    scale: dict[int, Rate] = field(default_factory=dict)
    slots: dict[Hashable, Rate] = field(default_factory=dict)
    per_step: dict[int, Rate] = field(default_factory=dict)
    use_scores: bool = True  # False: the trees' scores are no probabilities (a drafter's ranks)

    def scored(self, tree: TokenTree, node: int) -> bool:
        return self.use_scores and math.isfinite(tree.scores[node])

    def probabilities(self, tree: TokenTree, slots: dict[int, Hashable] | None = None,
                      certain: frozenset[int] = frozenset()) -> list[float]:
        """p(node) for every node (root: 1), monotone down every path. A node with a finite
        score is rated by its calibrated draft probability; a node in `slots` (node -> slot)
        by its parent's p times its slot's rate (the product of the slot rates down a chain);
        one that is both gets the larger; a node in `certain` (a path from the root) by 1."""
        slots = slots or {}
        probs = [1.0] * len(tree)
        for node in range(1, len(tree)):
            parent = tree.parents[node]
            if node in certain:
                continue
            scored = chained = 0.0
            if self.scored(tree, node):
                scored = self.scale.get(tree.depths[node], CALIBRATION_PRIOR).value * math.exp(tree.scores[node])
            if node in slots:  # P(parent accepted) x P(this slot accepted | its parent was)
                chained = probs[parent] * self.slots.get(slots[node], SLOT_PRIOR).value
            probs[node] = min(1.0, max(scored, chained))
        return monotone(tree, probs)

    def observe(self, tree: TokenTree, path: list[int], slots: dict[int, Hashable] | None = None) -> None:
        """After a step that verified `tree` and accepted `path` (node indices, root first)."""
        for rates, prior in ((self.scale, lambda d: CALIBRATION_PRIOR), (self.slots, lambda s: SLOT_PRIOR),
                             (self.per_step, depth_prior)):
            for key, rate in rates.items():
                rate.forget(prior(key), KEEP)
        slots, accepted = slots or {}, set(path)
        drafted: dict[int, float] = {}  # depth -> accepted scored nodes there (0 or 1)
        for node in range(1, len(tree)):
            hit = float(node in accepted)
            if self.scored(tree, node):
                depth = tree.depths[node]
                self.scale.setdefault(depth, replace(CALIBRATION_PRIOR)).add(hit, math.exp(tree.scores[node]))
                drafted[depth] = max(drafted.get(depth, 0.0), hit)
            if node in slots and tree.parents[node] in accepted:
                self.slots.setdefault(slots[node], replace(SLOT_PRIOR)).add(hit, 1.0)
        for depth, hit in drafted.items():
            self.per_step.setdefault(depth, depth_prior(depth)).add(hit, 1.0)


@dataclass
class TreeSizer:
    """Cuts each step's candidate tree to the size its expected tokens pay for (`size`),
    and learns from what the target accepted (`observe`)."""

    cost: CostCurve
    acceptance: Acceptance = field(default_factory=Acceptance)

    @classmethod
    def for_drafter_trees(cls, cost: CostCurve) -> TreeSizer:
        """A sizer for trees whose scores are a drafter's ranks, not probabilities: slot rates only."""
        return cls(cost, Acceptance(use_scores=False))

    def size(self, tree: TokenTree, context: int, extra_rows: float = 0.0, slots: dict[int, Hashable] | None = None,
             certain: frozenset[int] = frozenset(), load: Load = Load()) -> tuple[TokenTree, dict[int, Hashable], float]:
        """The kept tree, `slots` renumbered for it, and the tokens it is expected to commit.
        Nodes in `certain` (a path from the root the caller takes as accepted: a pipelined
        step's predicted trunk) are always kept, and the rest are rated given that path;
        `load`: the other steps of the pass it runs in."""
        probs = self.acceptance.probabilities(tree, slots, certain)
        m = max(best_size(probs[1:], self.cost.at(context), extra_rows, load), len(certain - {0}))
        pruned, kept = keep_most_likely(tree, probs, m, certain)
        slots = slots or {}
        return pruned, {new: slots[old] for new, old in enumerate(kept) if old in slots}, 1.0 + sum(probs[i] for i in kept[1:])

    def draft_depth(self, rows: int, expected: float, rows_per_depth: float, max_depth: int, context: int,
                    load: Load = Load()) -> int:
        """How deep a step of `rows` tree rows, expected to commit `expected` tokens, should
        draft the next tree. Drafting to depth d adds d * rows_per_depth rows (pseudo states)
        and is worth the tokens accepted per step at depths 1..d (Acceptance.per_step): the d
        maximising (expected + those tokens + load.tokens) / (t(rows + d * rows_per_depth +
        load.rows) + host), host being load.tree_host_ms unless the step is one row (a
        root alone, d = 0); 0: no drafts."""
        t = load.cost or self.cost.at(context)
        host = load.tree_host_ms
        best, best_rate = 0, (expected + load.tokens) / (t(rows + load.rows) + (host if rows > 1 else 0.0))
        rows, tokens = rows + load.rows, expected + load.tokens
        for depth in range(1, max_depth + 1):
            tokens += self.acceptance.per_step.get(depth, depth_prior(depth)).value
            rate = tokens / (t(rows + depth * rows_per_depth) + host)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = depth, rate
        return best

    def observe(self, tree: TokenTree, path: list[int], slots: dict[int, Hashable] | None = None) -> None:
        self.acceptance.observe(tree, path, slots)


def pseudo_row_cost(args: ModelArgs, layer: int) -> float:
    """What a pseudo-state row costs against a full row: it joins at `layer` of the n_layers
    and meets the LM head (matrix-product weights, which a decode step streams)."""
    attention = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + args.n_heads * args.head_dim * args.dim
    per_layer = attention + 3 * args.dim * args.intermediate_size
    head = args.vocab_size * args.dim
    return ((args.n_layers - layer) * per_layer + head) / (args.n_layers * per_layer + head)

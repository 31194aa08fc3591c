"""Choosing tokens from the target's logits: greedy, or sampling that every mode reproduces.

Sampling draws token n of a reply (n = 0, 1, ...) from the target distribution p_n
(temperature, then top-k, then top-p) by inverse CDF with the uniform u_n, the n-th
number of a generator seeded with the request's seed:

    token_n = the first v with cdf_n(v) > u_n   (cdf over the vocabulary in id order)

A tree step that starts at reply index n walks down from the root: at node x it draws
t = token_n from p(x), moves to x's child with token t when there is one (n + 1, repeat)
and otherwise ends with t as the bonus token. This is speculative sampling over a tree
with the drafts as point masses: child c_i is accepted with probability p(c_i) once its
earlier siblings were rejected, and the residual after rejecting c_1..c_j is p with
them removed; summed over the u's that is exactly "draw t ~ p, descend if t is a child".
So every token has the target's distribution, and, because p at an accepted node is the
target's distribution at that reply position, every lossless mode draws the very tokens
`ar` draws with the same seed (up to floating-point rounding of p).

A choice comes with a margin in logit units: how much the logits must move to change
it. For greedy it is the top-2 gap. For sampling it is the gap in log-odds between u_n
and the nearer edge c of the chosen token's CDF interval, times the temperature:
T * |ln(u (1 - c) / (c (1 - u)))|, the log-odds by which the mass below the edge must grow
or shrink to flip the draw (raising every logit of one side by d/2 and lowering the rest
by d/2 moves it by exactly d). So one rounding tolerance serves both (runtime.bench.harness).
"""

from __future__ import annotations

import math

import torch

from configs.schema import SamplingConfig


class NonFiniteLogitsError(ValueError):
    """NaN or +inf among the logits: a broken forward pass, never a token to draw."""


class Greedy:
    """argmax; the reply index is not needed."""

    def choose(self, logits: torch.Tensor, index: int) -> tuple[int, float]:
        """logits (vocab,) -> (argmax token, top-2 logit margin)."""
        top = torch.topk(finite_logits(logits), 2)
        return int(top.indices[0]), float(top.values[0] - top.values[1])


# The smallest divisor the float32 scaling uses: below it the distribution is the greedy
# one-hot anyway, and a temperature that rounds to 0 in float32 would give 0/0 = NaN.
SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits; NonFiniteLogitsError for NaN, +inf or a row of -inf (a single -inf
    is a token ruled out). amax propagates NaN, so one look at the maxima covers all three."""
    x = logits.float()
    if not torch.isfinite(x.amax(-1)).all():
        raise NonFiniteLogitsError("the model produced NaN or infinite logits")
    return x


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """logits (..., vocab) -> float32 sampling distribution: temperature, top-k, top-p.
    The logits are scaled in float32 with their maximum subtracted first, so the scaled
    values are <= 0 and finite or -inf whatever the temperature: a tiny temperature gives
    the greedy one-hot, never an overflow into NaN."""
    x = finite_logits(logits)
    x = (x - x.amax(-1, keepdim=True)) / max(config.temperature, SMALLEST_TEMPERATURE)
    if 0 < config.top_k < x.shape[-1]:
        kth = torch.topk(x, config.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if config.top_p < 1.0:
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        # Keep a token while the mass before it is still short of top_p: the smallest set
        # reaching top_p (the token that crosses it included).
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= config.top_p
        p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def inverse_cdf(p: torch.Tensor, u: float) -> tuple[int, float, float]:
    """p (vocab,) float32, u in [0, 1) -> (token, CDF below it, CDF through it), the CDF
    normalised to end at 1."""
    cdf = torch.cumsum(p, dim=0)
    cdf = cdf / cdf[-1]
    token = min(int(torch.searchsorted(cdf, torch.tensor([u], device=cdf.device), right=True)[0]), p.shape[0] - 1)
    return token, float(cdf[token - 1]) if token > 0 else 0.0, float(cdf[token])


def log_odds_gap(u: float, edge: float) -> float:
    """|log-odds(u) - log-odds(edge)|; infinite at the CDF's ends, which never move."""
    if not 0.0 < edge < 1.0:
        return math.inf
    u = min(max(u, 1e-12), 1 - 1e-12)
    return abs(math.log(u * (1 - edge) / (edge * (1 - u))))


# Uniforms drawn beyond max_new_tokens: a tree step may choose tokens past the limit
# (they are cut afterwards) but never more than its depth, which is far below this.
EXTRA_DRAWS = 1024


class Sampler:
    """Seeded, position-keyed draws: the choice for reply index n uses uniform n."""

    def __init__(self, config: SamplingConfig, max_new_tokens: int):
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        self.uniforms = torch.rand(max_new_tokens + EXTRA_DRAWS, generator=generator, dtype=torch.float64).tolist()

    def choose(self, logits: torch.Tensor, index: int) -> tuple[int, float]:
        """logits (vocab,), reply index n -> (token n, margin in logit units)."""
        u = self.uniforms[index]
        token, low, high = inverse_cdf(probabilities(logits, self.config), u)
        return token, self.config.temperature * min(log_odds_gap(u, low), log_odds_gap(u, high))


Chooser = Greedy | Sampler


def chooser(sampling: SamplingConfig | None, max_new_tokens: int) -> Chooser:
    """Greedy for no sampling or temperature 0, else the seeded Sampler."""
    if sampling is None or sampling.greedy:
        return Greedy()
    return Sampler(sampling, max_new_tokens)

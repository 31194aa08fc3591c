"""A successor prior: P(next token | this token), counted over training text, that makes a
pseudo-state draft depend on the token placed before it.

A hidden-transfer pseudo state for depth j never sees which token the tree puts at depth
j - 1 (nor, for depth 1, the root), so every parent gets the same children. The prior
rescores the drafts at depth j under each parent token p, a product of experts:

    log q_j(c | p) = log p_draft_j(c) + w_j * log P(c | p) - log Z_j(p)

P(c | p) = (count(p, c) + alpha) / (count(p) + alpha * vocab), from the bigram counts of
the training sequences (the model's own replies: what decoding drafts for), each token's
`max_successors` most frequent successors kept; every other token gets the smoothing
mass alone. Z_j(p) sums over the whole vocabulary exactly: the unseen tokens share one
factor, so it needs only the kept successors' draft probabilities. The weights w_j (one
per draft depth) are chosen on validation data (scripts/build_successor_prior.py). The
prior only reorders which drafts a tree checks: the target still decides every token.

Tables (CSR over the parent token, each row sorted by token id): offsets (vocab + 1,),
successors (nnz,), log_prior (nnz,) = log P(c | p) of each kept successor, unseen
(vocab,) = log P(unseen c | p).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


class SuccessorPrior:
    def __init__(self, offsets: torch.Tensor, successors: torch.Tensor, log_prior: torch.Tensor, unseen: torch.Tensor,
                 weights: list[float]):
        self.offsets, self.successors, self.log_prior, self.unseen = offsets, successors, log_prior, unseen
        self.weights = [float(w) for w in weights]  # by draft depth 1, 2, ...
        self.vocab_size = unseen.shape[0]
        self._successors, self._log_prior = successors.numpy(), log_prior.float().numpy()  # views for rescore
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}

    @classmethod
    def count(cls, sequences: list[list[int]], vocab_size: int, weights: list[float], max_successors: int = 64,
              alpha: float = 0.1) -> SuccessorPrior:
        """Bigram counts over `sequences` (no pair spans two sequences), add-`alpha` smoothed."""
        pairs = [torch.tensor(s, dtype=torch.long) for s in sequences if len(s) > 1]
        if not pairs:
            raise ValueError("a successor prior needs at least one sequence of two tokens")
        if min(int(s.min()) for s in pairs) < 0 or max(int(s.max()) for s in pairs) >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        keys = torch.cat([s[:-1] * vocab_size + s[1:] for s in pairs])
        keys, counts = keys.unique(return_counts=True)  # sorted by (parent, successor)
        parents, succ = keys // vocab_size, keys % vocab_size
        totals = torch.bincount(parents, weights=counts.double(), minlength=vocab_size)
        # Keep each parent's most frequent successors: sort by (parent, -count).
        order = torch.argsort(parents * (counts.max() + 1) + (counts.max() - counts))
        parents, succ, counts = parents[order], succ[order], counts[order]
        starts = torch.searchsorted(parents, torch.arange(vocab_size))
        rank = torch.arange(len(parents)) - starts[parents]
        keep = rank < max_successors
        parents, succ, counts = parents[keep], succ[keep], counts[keep]
        order = torch.argsort(parents * vocab_size + succ)  # each row by token id, for membership by bisection
        parents, succ, counts = parents[order], succ[order], counts[order]
        denominators = totals + alpha * vocab_size
        offsets = torch.zeros(vocab_size + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(parents, minlength=vocab_size).cumsum(0)
        log_prior = (torch.log(counts.double() + alpha) - torch.log(denominators[parents])).float()
        unseen = (math.log(alpha) - torch.log(denominators)).float()
        return cls(offsets, succ, log_prior, unseen, weights)

    def with_weights(self, weights: list[float]) -> SuccessorPrior:
        return SuccessorPrior(self.offsets, self.successors, self.log_prior, self.unseen, weights)

    def row(self, parent: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(successors, their log P(c | parent), log P(an unseen c | parent)) of one parent token."""
        if parent not in self._rows:
            s, e = int(self.offsets[parent]), int(self.offsets[parent + 1])
            self._rows[parent] = (self._successors[s:e], self._log_prior[s:e], float(self.unseen[parent]))
        return self._rows[parent]

    def rescore(self, logprobs: np.ndarray, parent: int, depth: int) -> tuple[np.ndarray, np.ndarray, float]:
        """For one depth's draft log-probabilities (vocab,) under `parent`: (the kept
        successors, their log q, the shift log q - log p_draft of every other token).
        NumPy: a tree step calls this once per node, on a few hundred numbers."""
        w = self.weights[depth - 1] if depth <= len(self.weights) else 0.0
        succ, log_prior, unseen = self.row(parent)
        if w == 0.0 or len(succ) == 0:
            return succ[:0], logprobs[:0], 0.0
        lp = logprobs[succ]
        seen_mass = min(float(np.exp(lp).sum()), 1.0)
        scored = lp + w * log_prior
        peak = float(scored.max())
        if not math.isfinite(peak):  # drafts that rule out every successor (-inf off their candidates)
            return succ[:0], logprobs[:0], 0.0
        # Z = sum over unseen c of p(c) e^{w unseen} + sum over seen c of p(c) e^{w log P(c|p)}
        z = (1.0 - seen_mass) * math.exp(w * unseen) + math.exp(peak) * float(np.exp(scored - peak).sum())
        log_z = math.log(z)
        return succ, scored - log_z, w * unseen - log_z

    def children(self, logprobs: np.ndarray, top: tuple[np.ndarray, np.ndarray], parent: int, depth: int,
                 k: int) -> tuple[list[float], list[int]]:
        """The `k` best children of `parent` at `depth`, best first, as (log q, token) lists:
        drawn from the draft's own top candidates `top` (log p, token) and the parent's
        kept successors, scored by the rescored distribution. `logprobs` is the depth's
        draft log-probabilities (vocab,) as a float32 NumPy array."""
        succ, succ_lq, shift = self.rescore(logprobs, parent, depth)
        top_lp, top_tok = top
        if len(succ) == 0:
            return top_lp[:k].tolist(), top_tok[:k].tolist()
        at = np.minimum(np.searchsorted(succ, top_tok), len(succ) - 1)  # rows are sorted by token id
        other = succ[at] != top_tok  # a top draft among the successors has its rescored log q there
        scores = np.concatenate((succ_lq, top_lp[other] + shift))
        tokens = np.concatenate((succ, top_tok[other]))
        best = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
        best = best[np.argsort(-scores[best], kind="stable")]
        return scores[best].tolist(), tokens[best].tolist()

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {"offsets": self.offsets, "successors": self.successors, "log_prior": self.log_prior,
                   "unseen": self.unseen, "weights": torch.tensor(self.weights, dtype=torch.float32)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"kind": "successor-prior", "info": json.dumps(extra or {})})

    @classmethod
    def load(cls, path: str | Path, vocab_size: int) -> SuccessorPrior:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"successor prior {path} does not exist (scripts/build_successor_prior.py makes one)")
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("kind") != "successor-prior":
                raise ValueError(f"{path} is not a successor prior")
            t = {k: f.get_tensor(k) for k in f.keys()}
        if t["unseen"].shape[0] != vocab_size:
            raise ValueError(f"{path} was counted over {t['unseen'].shape[0]} tokens; this model has {vocab_size}")
        return cls(t["offsets"], t["successors"], t["log_prior"], t["unseen"], t["weights"].tolist())

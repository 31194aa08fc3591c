"""A conditional head: the drafts of depth j made to depend on the token a tree places at
depth j - 1, learned (the successor prior, workers.drafters.successor_prior, counts it).

A hidden-transfer pseudo state for depth j never sees which token the tree puts above it
(for depth 1, the root: the bonus token the same pass chooses). For a node holding token
p, the head shifts the depth's pseudo state n_j (after the final norm) by a small MLP of
[n_j ; e(p)] and the depth,

    g_j(p) = W_out SiLU(W_in [n_j ; e(p) / rms(E)] + b_in + d_j) + b_out     (dim,)

and the LM head reads the node's own draft from n_j + g_j(p): a draft c gains
delta(c) = E_c . g_j(p) over its logit from n_j alone (E: the tied LM head). On top of
the successor prior's product of experts q_j(c | p) the children of a node are

    log q'(c | p) = log q_j(c | p) + delta(c) - log Z',   Z' = 1 + sum_C q_j(c | p)(e^delta(c) - 1)

over C, the node's `candidates` best children under the prior; the head leaves the rest
of the vocabulary as the prior has it (its delta taken as 0), so a step never runs the
full LM head per node. Training (scripts/build_conditional_head.py) uses the same
product with the shipped prior's weights, over the model's greedy choices on text the
hidden-transfer weights never trained on.

Per step, `ConditionedDrafts` holds the depths' pseudo states and their W_in halves; per
node it costs one (hidden x dim) product for the parent, one (dim x hidden) out, and
`candidates` dot products, in torch: NumPy's BLAS would start threads of its own that
spin beside torch's on a CPU (a tree step took 10 ms instead of 0.4 that way).
Nothing here touches the target's rows: the head only changes which drafts a tree checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.drafters.loading import DrafterWeightsError, read_model_weights
from workers.drafters.pseudo_states import model_signature
from workers.drafters.successor_prior import SuccessorPrior
from workers.model import ModelArgs

METADATA_KEY = "leapfrog.conditional_head"


@dataclass(frozen=True)
class ConditionalHeadConfig:
    hidden: int  # the MLP's width
    depths: int  # draft depths it conditions (the drafter's k)
    candidates: int = 16  # children per node it rescores (C)


class ConditionalHead(nn.Module):
    def __init__(self, args: ModelArgs, config: ConditionalHeadConfig):
        super().__init__()
        self.args, self.config = args, config
        self.w_in = nn.Linear(2 * args.dim, config.hidden)
        self.depth = nn.Embedding(config.depths, config.hidden)
        self.w_out = nn.Linear(config.hidden, args.dim)
        nn.init.zeros_(self.w_out.weight)  # starts as no shift: the prior alone
        nn.init.zeros_(self.w_out.bias)
        self.training_summary: dict = {}

    def shift(self, states: torch.Tensor, parent_embeddings: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        """states (N, dim) after the final norm, the parents' embeddings already scaled by
        1 / rms(E) (N, dim), depths (N,) from 0 -> g (N, dim), float32."""
        x = torch.cat((states.float(), parent_embeddings.float()), dim=-1)
        return self.w_out(F.silu(self.w_in(x) + self.depth(depths)))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        meta = {"config": asdict(self.config), "model": model_signature(self.args), "training": extra or {}}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, args: ModelArgs) -> ConditionalHead:
        meta, tensors = read_model_weights(path, METADATA_KEY, "conditional head", "python scripts/build_conditional_head.py",
                                           model_signature(args))
        head = cls(args, ConditionalHeadConfig(**meta["config"]))
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in tensors.items()}:
            raise DrafterWeightsError(f"{path}: tensors {sorted(tensors)} do not fit its config {head.config}")
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
        head.training_summary = meta.get("training", {})
        return head


class ConditionedHead:
    """A ConditionalHead ready for tree building: float32 NumPy copies of its weights and of
    the tied LM head (vocab, dim), and the successor prior it sits on."""

    def __init__(self, head: ConditionalHead, embeddings: torch.Tensor, prior: SuccessorPrior):
        dim = head.args.dim
        w_in = head.w_in.weight.detach().float()
        self.w_state, self.w_parent = w_in[:, :dim].contiguous(), w_in[:, dim:].contiguous()
        self.b_in = head.w_in.bias.detach().float()[None] + head.depth.weight.detach().float()  # (depths, hidden)
        self.w_out, self.b_out = head.w_out.weight.detach().float(), head.w_out.bias.detach().float()
        self.table = embeddings.detach().cpu()  # (vocab, dim): the tied LM head and embedding, read in place
        self.embed_scale = float(self.table.float().pow(2).mean().rsqrt())
        self.prior, self.config = prior, head.config

    def rows(self, tokens) -> torch.Tensor:
        """The LM head rows of `tokens` (an int or an array of them), float32."""
        return self.table[torch.as_tensor(tokens)].float()

    def for_step(self, states: torch.Tensor) -> ConditionedDrafts:
        """states (depth, dim): the pseudo states after the final norm that drafted this step's depths."""
        s = states.detach().float().cpu()
        depths = min(s.shape[0], self.config.depths)
        return ConditionedDrafts(self, s[:depths] @ self.w_state.T + self.b_in[:depths])


class ConditionedDrafts:
    """One step's children rescorer (build_dynamic_tree's `rescore`): the prior's children of
    a node, shifted by the head under the node's token."""

    def __init__(self, head: ConditionedHead, state_terms: torch.Tensor):
        self.head, self.state_terms = head, state_terms  # (depths, hidden): W_in's state half + biases
        self.candidates = head.config.candidates

    def children(self, logprobs: np.ndarray, top: tuple[np.ndarray, np.ndarray], parent: int, depth: int,
                 k: int) -> tuple[list[float], list[int]]:
        """The `k` best children of `parent` at `depth`, best first, as (log q', token) lists."""
        h = self.head
        scores, tokens = h.prior.children(logprobs, top, parent, depth, max(k, self.candidates))
        if depth > self.state_terms.shape[0] or not tokens:
            return scores[:k], tokens[:k]
        x = self.state_terms[depth - 1] + torch.mv(h.w_parent, h.rows(parent) * h.embed_scale)
        g = torch.mv(h.w_out, F.silu(x)) + h.b_out
        lq, tok = np.asarray(scores, dtype=np.float64), np.asarray(tokens)
        delta = torch.mv(h.rows(tok), g).double().numpy()
        log_z = math.log(max(1.0 + float(np.sum(np.exp(lq) * np.expm1(delta))), 1e-30))
        shifted = lq + delta - log_z
        best = np.argsort(-shifted, kind="stable")[:k]
        return shifted[best].tolist(), tok[best].tolist()

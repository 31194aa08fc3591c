"""The training objective of pseudo-state drafters, and their validation metrics
(runtime.training.trainer brings them to the one training loop, runtime.training.loop).

Any kind of workers.drafters.pseudo_states trains with the same data and loss:
hidden transfer (`--drafter ht`, at --layer L), Medusa heads (`medusa`, L = N) and PaSS
look-ahead embeddings (`pass`, L = 0). The backbone is frozen; only the drafter's
parameters learn. For each training sequence (a ShareGPT prompt and the model's own
greedy reply, from runtime.training.distill):

  1. Under no_grad, the whole model runs once over the real tokens with a KV cache,
     which gives the hidden state after L layers at every position (h_L), the target
     logits, and the K/V of every layer for positions 0..T-1.
  2. S positions t of the reply region (t + k < T) are drawn. The drafter maps h_L[t]
     to k pseudo states, placed at positions t+1..t+k, and they run through layers
     [L, N) against a read-only copy of the cached K/V (PrefixKV), through the same
     pseudo-state forward as decoding (workers.drafters.pseudo_forward). Pseudo state
     (t, j) sees real positions <= t and, with pseudo attention, pseudo states (t, < j):
     the same context as at inference, where the real tokens after t are not known yet.
  3. The LM head on pseudo state (t, j) drafts the token at t+j+1; the loss is
     KL(target softmax at t+j || draft softmax), averaged over the S*k drafts.

Only S*k rows per sequence carry gradients, so a step costs one no_grad forward of the
sequence plus a small forward/backward through the upper layers.

Several sequences can share those two forwards (`pack_loss`): they are packed end to end
into one row of tokens, each attending only to itself (a block-diagonal causal mask, its
own positions from 0), and each anchor's pseudo states see only its own sequence's
tokens up to the anchor. The loss is the same as one sequence at a time, with far fewer
launches: what a GPU wants, where a step of one short sequence is all launch overhead.

Validation reports, per draft depth j, top-1 and top-5 accuracy of the draft against
the target's argmax at t+j (the greedy token at t+j+1), and the mean number of drafts a
single greedy chain would accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.drafters.pseudo_forward import pseudo_block, pseudo_positions, pseudo_state_layers, run_to_end
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.model import Transformer

EVAL_CHUNK = 64  # positions per forward in validation


class PrefixKV:
    """Read-only stand-in for a KVCache holding a committed prefix of `length` positions.

    `write(layer, k, v)` returns the stored prefix K/V of that layer followed by the new
    k/v and stores nothing, so any number of pseudo-state batches can attend to the same
    prefix. Holds layers [first_layer, n_layers) only.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], first_layer: int = 0):
        self.k, self.v, self.first_layer = k, v, first_layer
        self.length = k[0].shape[2] if k else 0

    @classmethod
    def from_cache(cls, cache, first_layer: int = 0) -> PrefixKV:
        """Copy the committed K/V of layers [first_layer, ...) out of a KVCache."""
        n = cache.length
        layers = range(first_layer, cache.k.shape[0])
        return cls([cache.k[i, :, :, :n].clone() for i in layers], [cache.v[i, :, :, :n].clone() for i in layers], first_layer)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer < self.first_layer:
            raise ValueError(f"PrefixKV holds layers from {self.first_layer}, not layer {layer}")
        pk, pv = self.k[layer - self.first_layer], self.v[layer - self.first_layer]
        if pk.shape[0] != k.shape[0]:
            pk, pv = pk.expand(k.shape[0], -1, -1, -1), pv.expand(k.shape[0], -1, -1, -1)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)


@dataclass
class Encoded:
    anchors: dict[int, torch.Tensor]  # layer -> (T, dim) hidden states after that many layers:
    #                                   the drafter's layer and each refine layer
    h_final: torch.Tensor  # (T, dim) hidden state after all layers (before the final norm)
    prefix: PrefixKV  # K/V of layers [layer, N) for positions 0..T-1
    starts: list[int]  # where each packed sequence begins among the T rows ([0] for one sequence)


@torch.no_grad()
def encode_sequence(model: Transformer, ids: list[int], layer: int, refine_layers: tuple[int, ...] = ()) -> Encoded:
    """One no_grad pass over the real tokens of one sequence (`encode_packed` of one)."""
    return encode_packed(model, [ids], layer, refine_layers)


@torch.no_grad()
def encode_packed(model: Transformer, seqs: list[list[int]], layer: int, refine_layers: tuple[int, ...] = ()) -> Encoded:
    """One no_grad pass over sequences packed end to end (T rows in all), all layers
    through one KV cache; each sequence sees only itself, at its own positions 0, 1, ..."""
    lengths = [len(ids) for ids in seqs]
    T, device = sum(lengths), model.device
    starts = [sum(lengths[:i]) for i in range(len(seqs))]
    cache = model.new_cache(T)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    mask = None if len(seqs) == 1 else torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril() for n in lengths])
    ctx = model.context(positions, cache, tree_mask=None if mask is None else mask.to(device))
    bounds = [layer, *refine_layers, model.args.n_layers]
    ids = torch.tensor([[t for s in seqs for t in s]], device=device)
    h = model.run_layers(model.embed(ids), ctx, 0, layer)
    anchors = {}
    for start, end in zip(bounds, bounds[1:]):
        anchors[start] = h[0]
        h = model.run_layers(h, ctx, start, end)
    cache.commit(T)
    return Encoded(anchors, h[0], PrefixKV.from_cache(cache, layer), starts)


def draft_logits(
    model: Transformer, ht: PseudoStateDrafter, enc: Encoded, ts: torch.Tensor, firsts: torch.Tensor | None = None
) -> torch.Tensor:
    """Draft logits (S, k, vocab), float32, for the anchor rows `ts` (S,): the LM head on `draft_states`."""
    states = draft_states(model, ht, enc, ts, firsts)
    return model.lm_head(states.reshape(-1, states.shape[-1])).float().reshape(*states.shape[:2], -1)


def draft_states(
    model: Transformer, ht: PseudoStateDrafter, enc: Encoded, ts: torch.Tensor, firsts: torch.Tensor | None = None
) -> torch.Tensor:
    """The pseudo states after the final norm (S, k, dim), for the anchor rows `ts` (S,); grad flows into ht.

    `firsts` (S,): the row where each anchor's sequence begins (None: all at row 0, one
    sequence). The pseudo-state forward (workers.drafters.pseudo_forward) from the
    drafter's layer on, over the S*k pseudo states alone: their anchors are the real rows
    ts, whose states at each layer `enc` holds, and the real tokens are the read-only prefix."""
    k, config = ht.config.k, ht.config
    S, T, device = ts.shape[0], enc.prefix.length, model.device
    firsts = torch.zeros_like(ts) if firsts is None else firsts
    positions = pseudo_positions(ts - firsts, k)
    block = torch.block_diag(*[pseudo_block(k, config.pseudo_attention)] * S).to(device)
    ctx = model.context(positions, enc.prefix, tree_mask=block)
    # Pseudo state (t, j) sees its own sequence's real tokens up to t only, as at inference.
    t_rows, first_rows = ts.repeat_interleave(k), firsts.repeat_interleave(k)
    keys = torch.arange(T, device=device)[None, :]
    ctx.mask[:, :T] &= (keys <= t_rows[:, None]) & (keys >= first_rows[:, None])
    empty = torch.zeros(1, 0, model.args.dim, dtype=model.dtype, device=device)
    steps = pseudo_state_layers(model, ht, empty, None, ctx, lambda layer, h: enc.anchors[layer][ts], start=config.layer)
    h = run_to_end(steps)
    return model.norm(h[0]).reshape(S, k, -1)


@torch.no_grad()
def target_logits(model: Transformer, enc: Encoded, ts: torch.Tensor, k: int) -> torch.Tensor:
    """Target logits (S, k, vocab), float32, at positions t+1..t+k: the distribution of token t+j+1."""
    rows = ts[:, None] + torch.arange(1, k + 1, device=ts.device)
    return model.lm_head(model.norm(enc.h_final[rows])).float()


def kl_loss(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(draft)) per row (..., vocab) -> (...), float32."""
    logp = torch.log_softmax(target.float(), dim=-1)
    logq = torch.log_softmax(draft.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def valid_positions(example: dict, k: int) -> tuple[int, int]:
    """[lo, hi) of positions t that get pseudo states: the last prompt token and the reply, t + k < T."""
    P, T = len(example["prompt_ids"]), len(example["prompt_ids"]) + len(example["reply_ids"])
    return P - 1, T - k


def usable(examples: list[dict], k: int) -> list[dict]:
    out = []
    for e in examples:
        lo, hi = valid_positions(e, k)
        if e["prompt_ids"] and hi > lo:
            out.append(e)
    return out


def pack_loss(
    model: Transformer, ht: PseudoStateDrafter, examples: list[dict], n_positions: int, generator: torch.Generator
) -> torch.Tensor:
    """The mean over `examples` of each one's mean KL over `n_positions` drawn positions
    (all of its positions if it has fewer), the examples packed into one forward."""
    k = ht.config.k
    seqs = [e["prompt_ids"] + e["reply_ids"] for e in examples]
    enc = encode_packed(model, seqs, ht.config.layer, ht.config.refine_layers)
    ts, firsts, owner = [], [], []
    for i, (e, first) in enumerate(zip(examples, enc.starts)):
        lo, hi = valid_positions(e, k)
        drawn = torch.randperm(hi - lo, generator=generator)[:n_positions] + lo + first
        ts.append(drawn)
        firsts.append(torch.full_like(drawn, first))
        owner.append(torch.full_like(drawn, i))
    ts, firsts, owner = (torch.cat(x).to(model.device) for x in (ts, firsts, owner))
    per_anchor = kl_loss(target_logits(model, enc, ts, k), draft_logits(model, ht, enc, ts, firsts)).mean(-1)  # (S,)
    counts = torch.bincount(owner, minlength=len(examples)).to(per_anchor.dtype)
    per_example = torch.zeros(len(examples), device=model.device).index_add(0, owner, per_anchor) / counts
    return per_example.mean()


@torch.no_grad()
def evaluate(model: Transformer, ht: PseudoStateDrafter, examples: list[dict], max_positions: int = 64) -> dict:
    """Validation KL, per-depth top-1/top-5 accuracy vs the target argmax, mean accepted chain."""
    k = ht.config.k
    n, kl_sum = 0, 0.0
    top1, top5, accepted = torch.zeros(k), torch.zeros(k), 0.0
    for e in examples:
        lo, hi = valid_positions(e, k)
        if hi <= lo:
            continue
        count = min(max_positions, hi - lo)
        ts_all = torch.linspace(lo, hi - 1, count).round().long().unique()
        enc = encode_sequence(model, e["prompt_ids"] + e["reply_ids"], ht.config.layer, ht.config.refine_layers)
        for chunk in ts_all.split(EVAL_CHUNK):
            ts = chunk.to(model.device)
            target = target_logits(model, enc, ts, k)
            draft = draft_logits(model, ht, enc, ts)
            kl_sum += kl_loss(target, draft).mean(-1).sum().item()
            want = target.argmax(-1, keepdim=True)  # (S, k, 1)
            hit1 = (draft.argmax(-1, keepdim=True) == want).squeeze(-1).cpu()
            hit5 = (draft.topk(min(5, draft.shape[-1]), dim=-1).indices == want).any(-1).cpu()
            top1 += hit1.float().sum(0)
            top5 += hit5.float().sum(0)
            accepted += hit1.long().cumprod(-1).sum().item()
            n += ts.shape[0]
    if n == 0:
        return {"positions": 0}
    return {
        "positions": n,
        "kl": kl_sum / n,
        "top1": [round(x, 4) for x in (top1 / n).tolist()],
        "top5": [round(x, 4) for x in (top5 / n).tolist()],
        "mean_accepted": round(accepted / n, 4),
    }


def format_eval(m: dict) -> str:
    if not m.get("positions"):
        return "val: no positions"
    pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
    return (
        f"val kl {m['kl']:.4f}  top1% {pct(m['top1'])}  top5% {pct(m['top5'])}  "
        f"accepted {m['mean_accepted']:.3f} ({m['positions']} positions)"
    )

"""One decoding worker of the pipelined runtime: a model replica, its own KV cache and a
pseudo-state drafter (hidden transfer by default). It holds no request state beyond its
cache: the coordinator (runtime.coordinator) says what to keep, what to catch up on and
which tree to verify.

A step is one forward pass over [catch-up tokens | tree nodes | pseudo states]:

  catch-up      committed tokens the cache lacks (causal); the prompt on the first step
  tree nodes    rooted at the last committed token (ancestor mask, positions by depth)
  pseudo        k per node in `pseudo_nodes`, joining at the drafter's layer

`step` is a generator: it yields a Prediction after `predict_layer` layers (the walk
read from the early-exit logits of the candidate tokens, so the coordinator can start
the next step on another worker), then returns the StepResult: the walk with the
target's own choices (runtime.tree_decoding.accept), its KV compacted in the cache,
and the drafts of the path's last pseudo states. Every step verifies from a committed
root, so its result is exact even when the tree was built on a wrong prediction.

`draft` is the asynchronous drafter's call: the first `layer` layers, norm and LM head
extend a chain one token at a time (early-exit self-drafting) in this worker's cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator

import torch

from runtime.config import SamplingConfig
from runtime.ht_decoding import next_drafts, pseudo_mask
from runtime.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult
from runtime.sampling import Greedy, Sampler, chooser
from runtime.tree_decoding import accept
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree import TokenTree

DRAFT_CANDIDATES = 8  # candidates per depth returned with the next drafts
OBSERVED_TOP_K = 8  # the target's best tokens after every node, for the coordinator's token recycling


def advance(steps: Generator) -> Prediction | StepResult | None:
    """The next item of a `step` generator: its Prediction (None when not asked for), or its
    StepResult (also first, when the step was aborted before predicting)."""
    try:
        return next(steps)
    except StopIteration as done:
        return done.value


def tree_from(tokens: list[int], parents: list[int]) -> TokenTree:
    if not tokens or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
        raise ValueError("a step's tree needs the root first and every parent before its child")
    depths = [0] * len(tokens)
    for i, p in enumerate(parents[1:], 1):
        depths[i] = depths[p] + 1
    return TokenTree(list(tokens), list(parents), depths, [0.0] * len(tokens))


def step_mask(catch_up: int, tree: TokenTree, device: torch.device) -> torch.Tensor:
    """(c + n, c + n) bool: catch-up tokens causal; tree nodes see them all and their ancestors."""
    c, n = catch_up, len(tree)
    mask = torch.zeros(c + n, c + n, dtype=torch.bool)
    mask[:c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
    mask[c:, :c] = True
    mask[c:, c:] = tree.ancestor_mask()
    return mask.to(device)


class DecodeWorker:
    def __init__(self, model: Transformer, drafter: PseudoStateDrafter, cache: KVCache):
        self.model, self.drafter, self.cache = model, drafter, cache
        self._request: tuple[int, dict | None] | None = None
        self._choose: Greedy | Sampler = Greedy()
        self._aborted: set[int] = set()
        self._lock = threading.Lock()
        self.steps_done = 0

    def abort(self, step_id: int) -> None:
        """Stop step `step_id` at its next layer (safe to call from another thread)."""
        with self._lock:
            self._aborted.add(step_id)

    def _is_aborted(self, step_id: int) -> bool:
        with self._lock:
            return step_id in self._aborted

    def health(self) -> dict:
        return {"steps": self.steps_done, "cache_length": self.cache.length, "device": str(self.model.device)}

    def _chooser(self, req: StepRequest) -> Greedy | Sampler:
        if self._request != (req.request_id, req.sampling):
            sampling = SamplingConfig(**req.sampling) if req.sampling else None
            self._choose, self._request = chooser(sampling, req.max_new_tokens), (req.request_id, req.sampling)
            with self._lock:  # step ids only grow: older ones can go (an early abort of this one stays)
                self._aborted = {s for s in self._aborted if s >= req.step_id}
        return self._choose

    @torch.inference_mode()
    def step(self, req: StepRequest) -> Generator[Prediction | None, None, StepResult]:
        """Yields the Prediction (None when predict_layer is 0) once, then returns the result."""
        start = time.perf_counter()
        model, drafter, cache = self.model, self.drafter, self.cache
        choose = self._chooser(req)
        tree = tree_from(req.tree_tokens, req.tree_parents)
        if req.context[-1] != tree.tokens[0]:
            raise ValueError("the tree's root must be the last context token")
        cache.truncate(req.keep)
        c, n, k = len(req.context) - 1, len(tree), drafter.config.k
        device = model.device
        positions = cache.length + torch.cat((torch.arange(c), c + torch.tensor(tree.depths))).to(device)
        node_mask = step_mask(c, tree, device)
        groups = [c + g for g in req.pseudo_nodes]
        h = model.embed(torch.tensor([req.context[:-1] + tree.tokens], device=device))
        ctx = model.context(positions, cache, node_mask)
        n_layers = model.args.n_layers
        refine = {layer: i for i, (layer, _) in enumerate(drafter.segments(n_layers)[1:])}
        prediction_due = req.predict_layer > 0
        for layer in range(n_layers + 1):
            if prediction_due and layer == min(req.predict_layer, n_layers):
                prediction_due = False
                yield self._predict(h[0, c : c + n], tree, req)
            if layer == drafter.config.layer and groups:  # the pseudo states join
                pseudo = drafter(h[0, groups]).reshape(1, len(groups) * k, -1)
                pseudo_pos = (positions[groups, None] + torch.arange(1, k + 1, device=device)).reshape(-1)
                mask = pseudo_mask(node_mask, groups, k, drafter.config.pseudo_attention)
                h = torch.cat((h, pseudo.to(h.dtype)), dim=1)
                ctx = model.context(torch.cat((positions, pseudo_pos)), cache, mask)
            elif layer in refine and groups:  # a later transfer (FIRP style)
                extra = drafter.refine(refine[layer], h[0, groups]).reshape(1, -1, h.shape[-1])
                h = torch.cat((h[:, : c + n], h[:, c + n :] + extra.to(h.dtype)), 1)
            if layer == n_layers:
                break
            if self._is_aborted(req.step_id):
                self._catch_up_only(h[:, :c], positions[:c], node_mask[:c, :c], layer)
                return StepResult(req.step_id, [], [], [], cache.length, [], [], time.perf_counter() - start, aborted=True)
            h = model.layers[layer](h, ctx)
        if req.predict_layer == 0:
            yield None
        h = model.norm(h[0, c:])
        logits = model.lm_head(h)  # (n + m*k, vocab): the nodes, then the pseudo states
        path, tokens, margins = accept(tree, logits[:n], choose, req.reply_index)
        observed = torch.topk(logits[:n], OBSERVED_TOP_K, dim=-1).indices.tolist()
        cache.keep(list(range(c)) + [c + node for node in path])
        drafts = next_drafts(tree, path, req.pseudo_nodes, logits[n:].reshape(len(groups), k, -1)) if groups else None
        self.steps_done += 1
        top = torch.topk(torch.log_softmax(drafts.float(), -1), DRAFT_CANDIDATES, -1) if drafts is not None else None
        return StepResult(
            req.step_id, tokens, margins, observed, cache.length,
            top.indices.tolist() if top is not None else [], top.values.tolist() if top is not None else [],
            time.perf_counter() - start,
        )

    def _catch_up_only(self, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, layer: int) -> None:
        """An aborted step still commits its catch-up tokens (committed ones): the rest of
        the layers for those rows only."""
        if h.shape[1]:
            self.model.run_layers(h, self.model.context(positions, self.cache, mask), layer)
            self.cache.commit(h.shape[1])

    def _predict(self, h: torch.Tensor, tree: TokenTree, req: StepRequest) -> Prediction:
        """Walk the tree with early-exit argmaxes over the tree's tokens and the candidates."""
        candidates = sorted(set(tree.tokens[1:]) | set(req.candidates))
        if not candidates:
            return Prediction(req.step_id, [], [])
        weight = self.model.lm_head.weight[torch.tensor(candidates, device=h.device)]
        scores = (self.model.norm(h) @ weight.T).float()  # (n, candidates)
        children, node, tokens = tree.children(), 0, []
        while True:
            ranked = [candidates[i] for i in scores[node].argsort(descending=True).tolist()]
            tokens.append(ranked[0])
            match = next((ch for ch in children[node] if tree.tokens[ch] == ranked[0]), None)
            if match is None:
                taken = {tree.tokens[ch] for ch in children[node]}
                return Prediction(req.step_id, tokens, [t for t in ranked[1:] if t not in taken][:3])
            node = match

    @torch.inference_mode()
    def draft(self, req: DraftRequest) -> DraftResult:
        start, model, cache = time.perf_counter(), self.model, self.cache
        if not req.tokens:
            raise ValueError("a draft request feeds at least one token")
        cache.truncate(req.keep)
        feed, drafted = list(req.tokens), []
        for _ in range(req.n):
            positions = torch.arange(cache.length, cache.length + len(feed), device=model.device)
            h = model.run_layers(model.embed(torch.tensor([feed], device=model.device)), model.context(positions, cache), 0, req.layer)
            cache.commit(len(feed))
            feed = [int(model.lm_head(model.norm(h[0, -1])).argmax())]
            drafted.append(feed[0])
        return DraftResult(drafted, cache.length, time.perf_counter() - start)

"""One decoding worker of the pipelined runtime: a model replica, its own KV cache and a
pseudo-state drafter (hidden transfer by default). It holds no request state beyond its
cache: the coordinator (runtime.pipeline.coordinator) says what to keep, what to catch
up on and which tree to verify.

A step is one tree step (workers.tree_step) over [catch-up tokens | tree nodes | pseudo
states], driven layer by layer:

  predict   after `predict_layer` layers the worker yields a Prediction: the walk read
            from the early-exit logits of the candidate tokens, so the coordinator can
            start the next step on another worker
  abort     before every layer it looks for an abort of the step; an aborted step still
            runs the rest of the layers for its catch-up rows (committed tokens) only
  result    the walk with the target's own choices, its KV compacted in the cache, the
            target's top tokens after every node and the drafts of the path

Every step verifies from a committed root, so its result is exact even when the tree
was built on a wrong prediction.

`draft` is the asynchronous drafter's call: early-exit self-drafting
(workers.drafters.early_exit) extends a chain in this worker's cache, or, for a drafter
worker that holds a separate draft model ([pipeline] drafter), its draft tree grows
(workers.drafters.draft_tree).

A worker without a pseudo-state drafter (a checkpoint with no trained [ht] weights, or
the draft model) verifies trees without pseudo states; its steps return no next drafts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator

import torch

from configs.schema import ModelConfig, PseudoStateModeConfig, SamplingConfig
from workers.drafters.draft_tree import GrowingDraftTree
from workers.drafters.draft_vocabulary import DraftVocabulary
from workers.drafters.early_exit import early_exit_chain
from workers.drafters.loading import load, weights_file
from workers.drafters.pseudo_states import PseudoStateDrafter
from workers.kernels.quant_blocks import dequantize, is_quantized
from workers.kv_cache import KVCache
from workers.loading import load_model
from workers.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult
from workers.model import Transformer
from workers.sampling import Chooser, Greedy, chooser
from workers.tree import TokenTree
from workers.tree_sizing import pseudo_row_cost
from workers.tree_step import decoding_cache, prompt_rows_of, tree_step

DRAFT_CANDIDATES = 8  # candidates per depth returned with the next drafts
OBSERVED_TOP_K = 8  # the target's best tokens after every node, for the coordinator's token recycling
DRAFT_TREE_ROWS = 64  # expanded rows a drafter's tree may hold beyond the committed tokens


def advance(steps: Generator) -> Prediction | StepResult | None:
    """The next item of a `step` generator: its Prediction (None when not asked for), or its
    StepResult (also first, when the step was aborted before predicting)."""
    try:
        return next(steps)
    except StopIteration as done:
        return done.value


class DecodeWorker:
    def __init__(self, model: Transformer, drafter: PseudoStateDrafter | None, cache: KVCache,
                 draft_vocabulary: list[int] | None = None):
        """`draft_vocabulary`: the token ids a drafter's tree drafts among (None: all of them)."""
        self.model, self.drafter, self.cache = model, drafter, cache
        self.vocabulary = DraftVocabulary(model, draft_vocabulary)
        # By draft depth: the drafter's first d pseudo positions (a step asks for its depth).
        self.drafters: dict[int, PseudoStateDrafter] = {}
        self.pseudo_row_cost, self.max_depth = 0.0, 0
        if drafter is not None:
            self.max_depth = drafter.config.k
            self.drafters = {d: drafter.first(d) for d in range(1, drafter.config.k)} | {drafter.config.k: drafter}
            self.pseudo_row_cost = pseudo_row_cost(model.args, drafter.config.layer)
        self._request: tuple[int, dict | None] | None = None
        self._choose: Chooser = Greedy()
        self._aborted: set[int] = set()
        self._lock = threading.Lock()
        self.steps_done = 0
        self.growing: GrowingDraftTree | None = None  # a drafter's tree (DraftRequest.width >= 1)

    def abort(self, step_id: int) -> None:
        """Stop step `step_id` at its next layer (safe to call from another thread)."""
        with self._lock:
            self._aborted.add(step_id)

    def _is_aborted(self, step_id: int) -> bool:
        with self._lock:
            return step_id in self._aborted

    def health(self) -> dict:
        return {"steps": self.steps_done, "cache_length": self.cache.length, "device": str(self.model.device)}

    def _chooser(self, req: StepRequest) -> Chooser:
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
        self.growing = None  # the cache is the step's now
        choose = self._chooser(req)
        tree = TokenTree.from_parents(req.tree_tokens, req.tree_parents)
        if req.context[-1] != tree.tokens[0]:
            raise ValueError("the tree's root must be the last context token")
        self.cache.truncate(req.keep)
        catch_up, n_layers = req.context[:-1], self.model.args.n_layers
        c, n = len(catch_up), len(tree)
        predict_at = min(req.predict_layer, n_layers) if req.predict_layer > 0 else None
        depth = self.max_depth if req.draft_depth is None else max(min(req.draft_depth, self.max_depth), 0)
        groups = req.pseudo_nodes if depth else []
        steps = tree_step(self.model, self.cache, tree, choose, req.reply_index, catch_up, self.drafters.get(depth), groups)
        while True:
            try:
                layer, h = next(steps)
            except StopIteration as done:
                outcome = done.value
                break
            if layer == predict_at:
                yield self._predict(h[0, c : c + n], tree, req)
            if layer < n_layers and self._is_aborted(req.step_id):
                steps.close()
                self._catch_up_only(h[:, :c], layer, prompt_rows_of(c, req.reply_index))
                return StepResult(req.step_id, [], [], [], self.cache.length, [], [], time.perf_counter() - start, 0.0)
        if predict_at is None:
            yield None
        self.steps_done += 1
        observed = torch.topk(outcome.logits, OBSERVED_TOP_K, dim=-1).indices.tolist()
        top = torch.topk(torch.log_softmax(outcome.drafts.float(), -1), DRAFT_CANDIDATES, -1) if outcome.drafts is not None else None
        return StepResult(
            req.step_id, outcome.tokens, outcome.margins, observed, self.cache.length,
            top.indices.tolist() if top is not None else [], top.values.tolist() if top is not None else [],
            time.perf_counter() - start, c + n + len(groups) * depth * self.pseudo_row_cost,
        )

    def _catch_up_only(self, h: torch.Tensor, layer: int, prompt: int) -> None:
        """An aborted step still commits its catch-up tokens (committed ones): the rest of
        the layers for those rows only, the first `prompt` of them prompt rows as before."""
        c = h.shape[1]
        if c:
            positions = self.cache.length + torch.arange(c, device=h.device)
            causal = torch.ones(c, c, dtype=torch.bool, device=h.device).tril()
            self.model.run_layers(h, self.model.context(positions, self.cache, causal, prompt), layer)
            self.cache.commit(c)

    def _predict(self, h: torch.Tensor, tree: TokenTree, req: StepRequest) -> Prediction:
        """Walk the tree with early-exit argmaxes over the tree's tokens and the candidates."""
        candidates = sorted(set(tree.tokens[1:]) | set(req.candidates))
        if not candidates:
            return Prediction(req.step_id, [], [])
        weight = self.model.lm_head.weight[torch.tensor(candidates, device=h.device)]
        if is_quantized(weight):  # the GGUF file's blocks (weights = "shipped")
            weight = dequantize(weight).to(h.dtype)
        scores = (self.model.norm(h) @ weight.T).float()  # (n, candidates)
        node, tokens = 0, []
        while True:
            ranked = [candidates[i] for i in scores[node].argsort(descending=True).tolist()]
            tokens.append(ranked[0])
            child = tree.child(node, ranked[0])
            if child is None:
                taken = {tree.tokens[ch] for ch in tree.children()[node]}
                return Prediction(req.step_id, tokens, [t for t in ranked[1:] if t not in taken][:3])
            node = child

    @torch.inference_mode()
    def draft(self, req: DraftRequest) -> DraftResult:
        start = time.perf_counter()
        if req.width:
            return self._draft_tree(req, start)
        if not req.tokens:
            raise ValueError("a draft request feeds at least one token")
        if not 1 <= req.layer <= self.model.args.n_layers:
            raise ValueError(f"a draft runs 1..{self.model.args.n_layers} layers, not {req.layer}")
        self.growing = None  # the cache is the chain's now
        self.cache.truncate(req.keep)
        drafted = early_exit_chain(self.model, self.cache, list(req.tokens), req.n, req.layer)
        return DraftResult(drafted, self.cache.length, time.perf_counter() - start, [], [], req.n)

    def _draft_tree(self, req: DraftRequest, start: float) -> DraftResult:
        if self.growing is None or self.growing.width != req.width:
            self.growing = GrowingDraftTree(self.model, self.cache, req.width, DRAFT_TREE_ROWS, self.vocabulary)
        self.growing.advance(req.keep, list(req.tokens))
        grown = self.growing.grow(req.n)
        tree = self.growing.tree()
        return DraftResult(tree.tokens, self.cache.length, time.perf_counter() - start, tree.parents, tree.scores, grown)


def load_worker(model_config: ModelConfig, ht: PseudoStateModeConfig | None, model=None,
                draft_vocabulary: list[int] | None = None) -> DecodeWorker:
    """A worker with its own KV cache; `model` shares an already loaded replica (in-process).
    `ht` None: no pseudo-state drafter (a draft model, or a checkpoint without [ht] weights).
    `draft_vocabulary`: a draft model's tokens to draft among (None: all)."""
    if model is None:
        model, _ = load_model(
            model_config.checkpoint, model_config.torch_dtype(), model_config.torch_device(), model_config.kernels,
            model_config.cuda_graphs, weights=model_config.weights,
        )
    if ht is None:
        return DecodeWorker(model, None, decoding_cache(model, model_config.max_context), draft_vocabulary)
    drafter = load(weights_file(model_config.checkpoint, "ht", ht.weights), model.args)
    if ht.depth:
        drafter = drafter.first(min(ht.depth, drafter.config.k))
    return DecodeWorker(model, drafter.to(model.device), decoding_cache(model, model_config.max_context))

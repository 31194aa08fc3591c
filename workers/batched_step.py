"""Steps of several sequences in one forward pass over one model (issue 18).

Each sequence owns its KV cache; the model's weights are shared. A pass lays the rows of
every sequence's step side by side (a `Segment`: a one-token `ar` step, or a tree step's
nodes and pseudo states, workers.tree_step): every product (projections, MLP, LM head)
runs once over all R rows, streaming each weight matrix once for all of them; attention
runs per sequence over its own cache, with its own mask. The kernels compute each row as
the sequence's own step computes it (workers.kernels: rows are independent; with the
native kernels, one `ragged_decoder_layer` call a layer), so a sequence's results are the
ones it gets alone.

`StepBatcher` gathers the steps that threads decoding at once (engines sharing one model:
runtime.engine.Engine.sibling) send. Each engine has a `Lane`, its seat in the batcher;
a reply counts itself active while it decodes (`Lane.decoding`). A thread that finds no
pass running waits until every active reply has its step in, or GATHER_S at most (a
reply may be in its prefill, or held back by a slow reader), then runs every waiting step
in one pass; the others wait for it and take their results. A reply alone never waits:
batching costs a lone request nothing. A prefill is a step too: its prompt rows share the
pass, multiplied by the kernels' many-row path with the other prompts' (ragged_prompt_layer).

Each lane also tells the others what its last step cost and was expected to commit
(`Lane.others`): tree modes size their trees on the rows of the whole pass
(workers.tree_sizing, load-aware speculation), so a tree shrinks toward a plain step as
the batch grows; where trees in shared passes do not pay at all (a CPU), an engine makes
its replies step plain while others decode (`Lane.plain_now`).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from workers.drafters.pseudo_forward import RowPlan, SameRows, planned_layers, run_to_end
from workers.kv_cache import KVCache
from workers.model import AttentionContext, DecoderLayer, Transformer
from workers.tree_sizing import Load

GATHER_S = 0.002  # how long a pass waits at least for the steps of active replies that have not sent theirs
MAX_GATHER_S = 0.015  # and at most, for replies whose steps come soon by their usual pace (Lane.gap)
GAP_KEEP = 0.8  # Lane.gap: an average over the last ~5 steps
PASS_KEEP = 0.98  # PassCost: a memory of ~50 passes
PASS_COST_AFTER = 16  # passes of several steps before PassCost is read
PASS_RIDGE = 1e-3  # PassCost's least squares: a ridge that keeps them solvable
PROMPT_CHUNK = 256  # prompt rows a pass carries at most (Lane.lead_in): a long prompt shares several passes


@dataclass
class Segment:
    """One sequence's step in a pass: its embedded rows h (1, n, dim), the rows and context
    each layer runs (a RowPlan: the same at every layer, or pseudo states joining), its
    cache, and the first row the LM head reads (a tree step's catch-up rows are read by no
    head). Its first prompt_rows rows take the prompt path of the kernels (workers.model.
    AttentionContext), in a pass too (ragged_prompt_layer)."""

    h: torch.Tensor
    rows: RowPlan
    cache: KVCache
    head_from: int = 0
    prompt_rows: int = 0


def one_token(model: Transformer, cache: KVCache, token: int) -> Segment:
    """The Segment of a one-token step (mode `ar`): `token` after the cache's prefix."""
    positions = torch.tensor([cache.length], device=model.device)
    return Segment(model.embed(torch.tensor([[token]], device=model.device)), SameRows(model.context(positions, cache)), cache)


def prompt_segment(model: Transformer, cache: KVCache, prompt_ids: list[int], ends_prompt: bool = True) -> Segment:
    """The Segment of a prefill: `prompt_ids` after the cache's prefix. When they end the
    prompt, every row but the last is a prompt row and the head reads the last
    (runtime.decoding.autoregressive.prefill); otherwise every row is a prompt row and no head reads them."""
    n = len(prompt_ids)
    prompt = n - 1 if ends_prompt else n
    positions = torch.arange(cache.length, cache.length + n, device=model.device)
    h = model.embed(torch.tensor([prompt_ids], device=model.device))
    return Segment(h, SameRows(model.context(positions, cache, prompt_rows=prompt)), cache, head_from=prompt, prompt_rows=prompt)


def head_logits(model: Transformer, rows: torch.Tensor) -> torch.Tensor:
    """The LM head over final states (rows, dim), before the norm; none for no rows."""
    if rows.shape[0] == 0:
        return rows.new_zeros(0, model.args.vocab_size)
    return model.lm_head(model.norm(rows))


def batched_forward(model: Transformer, segments: list[Segment]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every segment's rows through every layer in one pass; per segment, its final state
    (1, rows, dim) before the norm and the logits (rows - head_from, vocab) of its head rows.
    The caches get each segment's pending rows (the callers commit or keep them)."""
    for seg in segments:
        seg.cache.check_room(seg.h.shape[1])  # a full cache fails before the pass writes anything
    if len(segments) == 1:  # alone: the plain forward, whose layers run fused where they can
        seg = segments[0]
        h = run_to_end(planned_layers(model, seg.h, seg.rows))
        return [(h, head_logits(model, h[0, seg.head_from :]))]
    n_layers = model.args.n_layers
    joins = set().union(*(seg.rows.join_layers for seg in segments))
    parts = [seg.h for seg in segments]
    h = ctxs = cos = sin = None
    for layer in range(n_layers + 1):
        if h is None or layer in joins:  # (re)lay the rows: a plan may add rows or change its context here
            if h is not None:
                parts = list(h.split(counts, dim=1))
            planned = [seg.rows.before(layer, part) for seg, part in zip(segments, parts)]
            parts, ctxs = [p for p, _ in planned], [c for _, c in planned]
            counts = [p.shape[1] for p in parts]
            h = torch.cat(parts, dim=1)
            cos, sin = torch.cat([c.cos for c in ctxs]), torch.cat([c.sin for c in ctxs])
            order = prompt_rows_first(ctxs, counts, h.device)
        if layer < n_layers:
            if order is None:
                h = ragged_layer(model.layers[layer], h, cos, sin, ctxs, counts)
            else:
                h = ragged_prompt_layer(model.layers[layer], h, cos, sin, ctxs, counts, order)
    finals = h.split(counts, dim=1)
    heads = torch.cat([f[0, seg.head_from :] for seg, f in zip(segments, finals)])
    logits = head_logits(model, heads).split([c - seg.head_from for seg, c in zip(segments, counts)])
    return list(zip(finals, logits))


def ragged_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ctxs: list[AttentionContext], counts: list[int]) -> torch.Tensor:
    """DecoderLayer.forward over rows (1, R, dim), the next counts[s] of them sequence s's,
    attending with ctxs[s] (its mask and cache): the products over all rows, attention per
    sequence. One native call where the kernels have it."""
    caches = [ctx.cache for ctx in ctxs]
    fused = layer.kernels.ragged_decoder_layer
    if fused is not None and all(type(c) is KVCache for c in caches):
        eps, heads, kv_heads, head_dim, i = layer._shape
        out = fused(h, layer.weights(), eps, heads, kv_heads, head_dim, cos, sin, counts, [c.mask for c in ctxs],
                    [c.k[i] for c in caches], [c.v[i] for c in caches], [c.length for c in caches])
        if out is not None:
            return out
    attn = layer.self_attn
    qkv = attn.qkv(layer.input_layernorm(h), cos, sin)  # (1, R, (heads + 2 kv_heads) * head_dim)
    y = torch.cat([attn.attend(rows, ctx) for rows, ctx in zip(qkv.split(counts, dim=1), ctxs)], dim=1)
    h = h + attn.o_proj(y.to(h.dtype))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def prompt_rows_first(ctxs: list[AttentionContext], counts: list[int], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """For a pass with prompt rows (each sequence's first ctx.prompt_rows rows): an order of
    all rows with every prompt row first, its inverse, and how many prompt rows; None without."""
    if not any(ctx.prompt_rows for ctx in ctxs):
        return None
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()
    prompt = [torch.arange(s, s + ctx.prompt_rows) for s, ctx in zip(starts, ctxs)]
    rest = [torch.arange(s + ctx.prompt_rows, s + c) for s, c, ctx in zip(starts, counts, ctxs)]
    order = torch.cat(prompt + rest)
    return order.to(device), torch.argsort(order).to(device), sum(ctx.prompt_rows for ctx in ctxs)


def ragged_prompt_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        ctxs: list[AttentionContext], counts: list[int], order: tuple[torch.Tensor, torch.Tensor, int]
                        ) -> torch.Tensor:
    """ragged_layer for a pass with prompt rows: every product takes the prompt rows of all
    sequences first (the kernels' many-row path, kernels.prompt_linear, over all of them at
    once) and the other rows as their one-row steps take them; attention per sequence. A
    row's numbers are those of its sequence's step alone: each op computes every row on its own."""
    first, back, n = order
    attn = layer.self_attn
    x = layer.input_layernorm(h)[:, first]
    qkv = attn.qkv(x, cos[first], sin[first], n)[:, back]
    y = torch.cat([attn.attend(rows, ctx) for rows, ctx in zip(qkv.split(counts, dim=1), ctxs)], dim=1)
    h = h + attn.o_proj(y.to(h.dtype)[:, first], n)[:, back]
    return h + layer.mlp(layer.post_attention_layernorm(h)[:, first], n)[:, back]


class PassCost:
    """ms of a pass of two or more steps, by its rows and steps: a + b * rows + c * steps,
    fitted by least squares over the passes run, each weighing PASS_KEEP of the one after
    it (it follows the machine's load). Rows are counted as the steps' senders count them
    (Lane.forward: pseudo states at their share of a row). On this CPU a row in a pass of
    several requests costs more than the device's one-request curve t(n) says (each
    request's attention, and the rows' Python), so load-aware sizing reads this instead."""

    def __init__(self):
        self.xtx = torch.zeros(3, 3, dtype=torch.float64)
        self.xty = torch.zeros(3, dtype=torch.float64)
        self.passes = 0
        self.coef: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def observe(self, ms: float, rows: float, steps: int) -> None:
        x = torch.tensor([1.0, rows, steps], dtype=torch.float64)
        self.xtx = PASS_KEEP * self.xtx + torch.outer(x, x)
        self.xty = PASS_KEEP * self.xty + ms * x
        self.passes += 1
        if self.passes >= PASS_COST_AFTER:
            # A little ridge, never decayed: passes whose rows always equal their steps (every
            # step one row) leave rows and steps collinear, which alone would be singular.
            coef = torch.linalg.solve(self.xtx + PASS_RIDGE * torch.eye(3, dtype=torch.float64), self.xty)
            self.coef = coef if coef[1] > 0 else self.coef  # a row never makes a pass cheaper

    def __call__(self, rows: float, steps: int) -> float:
        a, b, c = self.coef.tolist()
        return max(a + b * rows + c * steps, 0.1)


@dataclass
class _Step:
    lane: Lane
    segment: Segment
    result: tuple[torch.Tensor, torch.Tensor] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class ReplyBatching:
    """How one reply's steps ran (the policy's outcome, in the server's Stats): its steps,
    those that shared their pass with other replies' steps, the steps of those passes in
    all, and its rows (what its trees cost, pseudo states at their share)."""

    steps: int = 0
    shared: int = 0
    pass_steps: int = 0
    rows: float = 0.0

    def summary(self) -> dict:
        n = max(self.steps, 1)
        return {"batched_steps": self.shared, "mean_pass_steps": round(self.pass_steps / n, 2),
                "mean_step_rows": round(self.rows / n, 2)}


@dataclass
class BatchStats:
    passes: int = 0
    steps: int = 0
    rows: int = 0
    largest: int = 0
    by_size: dict[int, int] = field(default_factory=dict)  # passes by their number of steps
    trees_shared: int = 0  # steps of several rows (token trees) that shared their pass with other steps
    prompt_steps: int = 0  # steps with prompt rows (a prefill or a part of one, a first tree step)
    prefills_shared: int = 0  # those that shared their pass

    def summary(self) -> dict:
        p = max(self.passes, 1)
        return {"passes": self.passes, "steps_per_pass": round(self.steps / p, 2), "rows_per_pass": round(self.rows / p, 2),
                "largest": self.largest, "by_size": dict(sorted(self.by_size.items())), "trees_shared": self.trees_shared,
                "prompt_steps": self.prompt_steps, "prefills_shared": self.prefills_shared}


class Lane:
    """One engine's seat in a StepBatcher: a reply at a time decodes through it."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher
        self.active = False
        self.rows, self.tokens = 1.0, 1.0  # of its last step (a plain step until it sends one)
        # When its last step's result came back, and how long it takes to send the next one
        # (its host work: accepting, drafting, streaming), which the gathering waits for;
        # also apart for one-row steps and tree steps (`host`: seconds, averaged; None: none seen).
        self.returned: float | None = None
        self.gap = 0.0
        self.host: dict[bool, float | None] = {False: None, True: None}  # by "is a tree step"
        self.last_tree = False  # whether its last step was a tree step
        self.plain_when_shared = False  # set by its engine ([tree_sizing] shared): see plain_now
        self.reply = ReplyBatching()  # how the reply decoding now (or last) was batched

    def decoding(self, steps: Iterator) -> Iterator:
        """A reply's steps, with the reply counted active from its first step to its end."""
        b = self.batcher
        with b._cond:  # a reply left unfinished before this one (its steps never closed) counts no more
            self.active, self.rows, self.tokens, self.returned = True, 1.0, 1.0, None
            self.reply = reply = ReplyBatching()
        try:
            yield from steps
        finally:
            with b._cond:
                if self.reply is reply:  # not a reply left unfinished, closed while a later one decodes
                    self.active = False
                b._cond.notify_all()  # a pass may be waiting for this reply's step

    def forward(self, segment: Segment, expected_tokens: float = 1.0, rows: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """batched_forward's result for `segment`, run in one pass with the other lanes' steps
        that are ready. What the others read of it (`others`): `expected_tokens`, what the
        step is expected to commit, and `rows`, what it costs in full rows (its pseudo states
        cost less: workers.tree_sizing.pseudo_row_cost), by default its rows."""
        if segment.prompt_rows:  # a prefill: what the others may expect of this reply is its next step
            self.rows, self.tokens = 1.0, 1.0
        else:
            self.rows, self.tokens = float(segment.h.shape[1]) if rows is None else rows, expected_tokens
        return self.batcher._forward(_Step(self, segment))

    def lead_in(self, model: Transformer, cache: KVCache, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Prompt rows `ids` (after the cache's prefix; the prompt's last token not among them,
        or last), all but the last PROMPT_CHUNK of them run into the cache in passes of
        PROMPT_CHUNK rows: their final states (rows, dim) and the ids left for the caller's
        own step. So a long prompt never holds the other replies' passes for long; each
        prompt row is computed on its own, so its numbers are those of one prefill."""
        cut = max(len(ids) - PROMPT_CHUNK, 0)
        states = []
        for start in range(0, cut, PROMPT_CHUNK):
            chunk = ids[start : min(start + PROMPT_CHUNK, cut)]
            h, _ = self.forward(prompt_segment(model, cache, chunk, ends_prompt=False))
            cache.commit(len(chunk))
            states.append(h[0])
        return (torch.cat(states) if states else torch.empty(0, model.args.dim, device=model.device)), ids[cut:]

    def decode(self, model: Transformer, cache: KVCache, token: int) -> torch.Tensor:
        """runtime.decoding.autoregressive.decode_one's contract: append `token` to `cache`,
        return the logits (vocab,) for the position after it."""
        if model is not self.batcher.model:
            raise ValueError("this batcher steps another model")
        _, logits = self.forward(one_token(model, cache, token))
        cache.commit(1)
        return logits[0]

    def plain_now(self) -> bool:
        """Whether this reply's next step is to be plain (a tree of its root alone, no drafts):
        when its engine says so while other replies share the passes (on this CPU, trees in
        shared passes measured slower than plain steps: their Python runs one reply at a
        time and holds every reply's next pass up)."""
        if not self.plain_when_shared:
            return False
        with self.batcher._cond:
            return any(lane.active and lane is not self for lane in self.batcher._lanes)

    def others(self) -> Load:
        """The rows and expected tokens of the other active replies' last steps, and the cost
        of a pass with them and this one by its rows (PassCost) once passes measured it."""
        b = self.batcher
        with b._cond:
            lanes = [lane for lane in b._lanes if lane.active and lane is not self]
            if not lanes:
                return Load()
            steps = len(lanes) + 1
            cost = (lambda rows: b.pass_cost(rows, steps)) if b.pass_cost.ready else None
            return Load(sum(lane.rows for lane in lanes), sum(lane.tokens for lane in lanes), cost, self.tree_host_ms())

    def tree_host_ms(self) -> float:
        """How much longer this lane's host work takes after a tree step than after a one-row
        step (ms; a one-row step not seen yet counts as free): what a tree step costs a
        shared pass beyond its rows, as the replies' Python runs one at a time."""
        tree, plain = self.host[True], self.host[False]
        return 0.0 if tree is None else 1000 * max(tree - (plain or 0.0), 0.0)


class StepBatcher:
    """Steps from any number of threads, run together (module docstring)."""

    def __init__(self, model: Transformer):
        self.model = model
        self._cond = threading.Condition()
        self._waiting: list[_Step] = []
        self._running = False
        self._lanes: weakref.WeakSet[Lane] = weakref.WeakSet()  # an engine dropped takes its lane along
        self.stats = BatchStats()
        self.pass_cost = PassCost()

    def lane(self) -> Lane:
        """A new seat (one per engine)."""
        lane = Lane(self)
        with self._cond:
            self._lanes.add(lane)
        return lane

    def _active(self) -> int:
        return sum(lane.active for lane in self._lanes)

    def _forward(self, step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        step.segment.cache.check_room(step.segment.h.shape[1])  # a full cache fails its own request, not the pass
        deadline = None
        with self._cond:
            lane = step.lane
            # a tree's host work is before its step (building it) and after (accepting, drafting);
            # a prefill's is a plain step's (its reply's first token)
            tree = not step.segment.prompt_rows and (step.segment.h.shape[1] > 1 or bool(step.segment.rows.join_layers))
            if lane.returned is not None:
                gap = time.monotonic() - lane.returned
                lane.gap = gap if lane.gap == 0 else GAP_KEEP * lane.gap + (1 - GAP_KEEP) * gap
                last = lane.host[tree or lane.last_tree]
                lane.host[tree or lane.last_tree] = gap if last is None else GAP_KEEP * last + (1 - GAP_KEEP) * gap
            lane.last_tree = tree
            self._waiting.append(step)
            self._cond.notify_all()  # a thread gathering a pass may now have every step
            while not step.done:
                if self._running:
                    self._cond.wait()
                    deadline = None  # gather afresh once the pass in flight is over
                    continue
                if len(self._waiting) < self._active():
                    deadline = deadline or self._gather_deadline()
                    left = deadline - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                batch, self._waiting, self._running = self._waiting, [], True
                break
        if not step.done:  # this thread runs the pass: its own step and whoever waits
            self._run(batch)
        if step.error is not None:
            raise step.error
        return step.result

    def _gather_deadline(self) -> float:
        """Until when a pass waits for the active replies that have not sent their steps:
        GATHER_S at least; up to MAX_GATHER_S for those expected by their usual pace."""
        now = time.monotonic()
        sent = {id(s.lane) for s in self._waiting}
        expected = [lane.returned + 1.25 * lane.gap for lane in self._lanes
                    if lane.active and id(lane) not in sent and lane.returned is not None]
        return min(now + MAX_GATHER_S, max([now + GATHER_S, *expected]))

    def _run(self, batch: list[_Step]) -> None:
        start = time.perf_counter()
        try:
            for s, result in zip(batch, batched_forward(self.model, [s.segment for s in batch])):
                s.result = result
        except BaseException as e:  # noqa: BLE001 - each waiting step raises it in its own thread
            for s in batch:
                s.error = e
        with self._cond:
            now = time.monotonic()
            for s in batch:
                s.done, s.lane.returned = True, now
                r = s.lane.reply
                r.steps, r.shared, r.pass_steps, r.rows = r.steps + 1, r.shared + (len(batch) > 1), r.pass_steps + len(batch), r.rows + s.lane.rows
            self._running = False
            prompts = sum(bool(s.segment.prompt_rows) for s in batch)
            if len(batch) > 1 and not prompts and not any(s.error for s in batch):  # prompt rows cost otherwise
                self.pass_cost.observe(1000 * (time.perf_counter() - start), sum(s.lane.rows for s in batch), len(batch))
            st = self.stats
            st.passes, st.steps, st.largest = st.passes + 1, st.steps + len(batch), max(st.largest, len(batch))
            st.rows += sum(s.segment.h.shape[1] for s in batch)
            st.trees_shared += sum(s.segment.h.shape[1] > 1 and not s.segment.prompt_rows for s in batch) if len(batch) > 1 else 0
            st.prompt_steps, st.prefills_shared = st.prompt_steps + prompts, st.prefills_shared + (prompts if len(batch) > 1 else 0)
            st.by_size[len(batch)] = st.by_size.get(len(batch), 0) + 1
            self._cond.notify_all()

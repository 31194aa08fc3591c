"""Steps of the replies decoding at once, gathered into shared passes (issue 18).

`StepBatcher` gathers the steps that threads decoding at once (engines sharing one model:
runtime.engine.Engine.sibling) send, and runs them in one pass over the model
(workers.batched_step.batched_forward: each sequence's rows get the bits they get alone).
Each engine has a `Lane`, its seat in the batcher; a reply counts itself active while it
decodes (`Lane.decoding`). A thread that finds no pass running waits until every active
reply has its step in, or GATHER_S at most (a reply may be in its prefill, or held back by
a slow reader), then runs every waiting step in one pass; the others wait for it and take
their results. A reply alone never waits: batching costs a lone request nothing.

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

from runtime.batching.pass_cost import PassCost
from workers.batched_step import Segment, batched_forward, one_token, prompt_segment
from workers.kv_cache import KVCache
from workers.model import Transformer
from workers.tree_sizing import Load

GATHER_S = 0.002  # how long a pass waits at least for the steps of active replies that have not sent theirs
MAX_GATHER_S = 0.015  # and at most, for replies whose steps come soon by their usual pace (Lane.gap)
GAP_KEEP = 0.8  # Lane.gap: an average over the last ~5 steps
PROMPT_CHUNK = 256  # prompt rows a pass carries at most (Lane.lead_in): a long prompt shares several passes


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

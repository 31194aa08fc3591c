"""The pipelined runtime's coordinator: owns each request's committed tokens and decides
what every worker runs next (modes `pipeline` and `async`).

Every step verifies a token tree rooted at the last committed token
(runtime.pipeline.launch_trees, workers.decode_worker), so whatever a step returns is
exact; the coordinator only decides which trees are worth running, and when. `generate`
calls `step()` until the reply is done; each call takes the next event from the workers
and does what it says, then launches what is free:

  launch     every free verifier gets a tree: from the committed root, its trunk is the
             predicted walk of the newest step in flight (pipeline: that step told its
             Prediction after `predict_layer` layers), or nothing when no step is in
             flight. A prediction seeds one launch ("chain": its alternatives ride as
             leaves) or one per alternative ("fanout"). With a LaunchSizer each tree,
             and the depth of its drafts, is cut to what pays on the workers' t(n).
  predict    a step's Prediction arrives: the next worker can start on it.
  commit     a step's result arrives: the tokens past the committed ones are committed
             (clipped at max_new_tokens and stop tokens) and streamed; its drafts seed
             the next trees.
  roll back  steps in flight whose trees no longer contain the committed tokens can add
             nothing: they are aborted and counted as wasted;
             their workers' caches are cut back to the committed prefix on their next step.
  draft      (async) worker 0 drafts ahead. With the target's first layers it drafts a
             chain, continued while the committed tokens agree with it and restarted from
             them otherwise; every verifier tree carries the chain. Holding the [draft]
             model ([pipeline] drafter), it only drafts: a tree grown while the verifiers
             verify (workers.drafters.draft_tree), re-rooted at each commit; a verifier's
             tree starts from its part below the committed tokens.
  fault      a step or draft that raises or passes `step_timeout` retires its worker:
             the request goes on with the others (down to one verifier, and to plain
             verification without the drafter) while the worker restarts; one that
             cannot be restarted sits out the request. When no verifier is left, an
             early-exit async drafter verifies; only a request with no worker left fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import torch

from configs.schema import DrafterConfigs, PipelineConfig, SamplingConfig
from runtime.decoding.steps import Step, clip_step
from runtime.pipeline.launch_trees import (Drafts, GivenTree, LaunchSizer, build_launch_tree, observe_commit,
                                           predict_from_drafts, reply_proposers)
from runtime.pipeline.metrics import Metrics
from runtime.pipeline.reply_state import Launch, ReplyState, WorkerCache, can_extend, hypotheses, next_trunk, subtree_paths
from runtime.pipeline.transport import Transport, WorkerFailed
from workers.decode_worker import OBSERVED_TOP_K
from workers.drafters.base import TreeProposer
from workers.drafters.eagle import best_nodes
from workers.drafters.successor_prior import SuccessorPrior
from workers.drafters.token_recycling import TokenRecyclingDrafter
from workers.messages import DraftRequest, DraftResult, Prediction, StepRequest, StepResult
from workers.tree import TokenTree, subtree

RESTART_ATTEMPTS = 3
MODES = ("pipeline", "async")


class Coordinator:
    def __init__(self, transport: Transport, config: PipelineConfig, drafters: DrafterConfigs, vocab_size: int,
                 sizing: LaunchSizer | None = None, prior: SuccessorPrior | None = None, pseudo_states: bool = True,
                 draft_model: bool = False):
        """`sizing`, when given, cuts every launch tree to what pays on the workers' step cost;
        `prior`, when given, rescores each drafted node's children under its token;
        `pseudo_states` False: the verifiers have no pseudo-state drafter (their trees
        start with token recycling's); `draft_model`: worker 0 holds the [draft] model."""
        self.transport, self.config, self.drafters, self.vocab = transport, config, drafters, vocab_size
        self.sizing, self.prior = sizing, prior
        self.pseudo_states = pseudo_states
        self.pseudo_nodes = drafters.ht.pseudo_nodes if pseudo_states else 0
        self.draft_model = draft_model  # then worker 0 drafts and never verifies
        self.drafter: int | None = None  # async: the drafting worker (per request, see _use)
        self.verifiers = list(range(transport.size))
        # Each worker's cache, whatever role it had when it was filled: a worker that drafted
        # for an async reply verifies a later pipeline reply from what is complete in it.
        self.cached = {i: WorkerCache() for i in range(transport.size)}
        self.busy: dict[int, asyncio.Task] = {}
        self.down: set[int] = set()
        self.restarting: dict[int, asyncio.Task] = {}
        self.next_id = 0
        self.last_metrics: Metrics | None = None
        # The target's best next tokens after each token, refreshed by every step and kept
        # across requests (token recycling): bonus-token candidates and continuations.
        self.recycling = TokenRecyclingDrafter(vocab_size, OBSERVED_TOP_K, max(config.continuation_budget, 1))
        self.recycled = TreeProposer(self.recycling, from_root_token=True)
        self.aborts: set[asyncio.Future] = set()
        self.current: ReplyState | None = None  # one request at a time: the workers' caches are its
        self.lock = asyncio.Lock()

    def check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"the coordinator runs modes {MODES}, not {mode!r}")
        if (mode == "async" or self.draft_model) and self.transport.size < 2:
            why = "worker 0 holds the [draft] model" if self.draft_model else "one drafts"
            raise ValueError(f"mode {mode} needs at least 2 workers: {why}, the others verify")

    def _use(self, mode: str) -> None:
        """async: worker 0 drafts and the others verify; pipeline: all verify (but a draft
        model's worker)."""
        self.check_mode(mode)
        self.drafter = 0 if mode == "async" else None
        self.verifiers = [i for i in range(self.transport.size) if i != self.drafter and not (i == 0 and self.draft_model)]

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def generate(
        self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], sampling: SamplingConfig | None = None,
        mode: str = "pipeline",
    ) -> AsyncIterator[Step]:
        """The reply as Steps, exactly `ar`'s tokens. Bad settings raise here, before any
        worker sees them (a message that cannot be sent would count as a worker's fault)."""
        self.check_mode(mode)
        if sampling is not None:
            sampling.validate()
        greedy = sampling is None or sampling.greedy
        req = ReplyState(self._id(), list(prompt_ids), len(prompt_ids), max_new_tokens, set(stop_ids),
                         None if greedy else asdict(sampling))
        pld = self.drafters.pld if self.config.lookup else None
        ht = self.drafters.ht if self.pseudo_states else None
        req.proposers, req.continuation = reply_proposers(prompt_ids, ht, pld, self.prior, self.recycled)
        start = time.perf_counter()
        await self.lock.acquire()
        self.current = req
        try:
            self._use(mode)
            await self.start_workers()
            self._schedule(req)
            while not req.done:
                for step in await self.step(req):
                    req.metrics.first_s = req.metrics.first_s or time.perf_counter() - start
                    yield step
        finally:
            await self._drain(req)
            req.metrics.wall_s = time.perf_counter() - start
            self.last_metrics, self.current = req.metrics, None
            self.lock.release()

    async def start_workers(self) -> None:
        """Create the workers that do not exist yet, all at once (the first request waits
        for its replicas to load; later requests find them ready), and restart those that
        sat out the last request; each within `start_timeout`."""
        missing = [i for i in range(self.transport.size) if i not in self.transport.handles and i not in self.down]
        if missing:
            try:
                await asyncio.wait_for(asyncio.gather(*(self.transport.handle(i) for i in missing)), self.config.start_timeout)
            except asyncio.TimeoutError:
                raise WorkerFailed(f"workers {missing} did not start in {self.config.start_timeout:.0f} s") from None
        for i in [i for i in self.down if i not in self.restarting]:
            try:
                await asyncio.wait_for(self.transport.restart(i), self.config.start_timeout)
                self.down.discard(i)
            except Exception:  # noqa: BLE001 - it stays down; the others serve
                pass

    async def step(self, req: ReplyState) -> list[Step]:
        """The next event from the workers, handled (predict, commit and roll back, draft,
        fault), then a launch on every free worker; returns the Steps it committed."""
        # Bounded: every step, draft and restart that can post an event has its own timeout.
        kind, item, payload = await req.events.get()
        tick = time.perf_counter()
        steps = self._handle(req, kind, item, payload)
        self._schedule(req)
        req.metrics.coordinator_s += time.perf_counter() - tick
        return steps

    # --- events -------------------------------------------------------------------------

    def _handle(self, req: ReplyState, kind: str, item, payload) -> list[Step]:
        if kind == "prediction":
            self._predicted(req, item, payload)
        elif kind == "result":
            return self._commit(req, item, payload)
        elif kind == "draft":
            self._drafted(req, *item, payload)
        elif kind == "fault":
            self._fault(req, item, payload)
        elif kind == "restarted" and isinstance(payload, Exception):  # it sits out; the others go on
            req.errors[item] = f"could not be restarted: {payload}"
        return []

    def _predicted(self, req: ReplyState, launch: Launch, prediction: Prediction | None) -> None:
        if prediction is None or launch.step_id not in req.launches or not prediction.tokens:
            return
        launch.hypotheses = hypotheses(prediction, self.config.alternatives)

    def _commit(self, req: ReplyState, launch: Launch, result: StepResult) -> list[Step]:
        live = req.launches.pop(launch.step_id, None) is not None  # else aborted and counted already
        m = req.metrics
        m.steps += 1
        m.worker_s += result.forward_s
        m.step_s += result.forward_s
        m.round_trip_s += time.perf_counter() - launch.started
        m.forward_tokens += len(launch.request.context) - 1 + len(launch.plan.tree)
        full = launch.base + result.tokens
        if result.observed:
            self.recycling.observe(launch.plan.tree, [], torch.tensor(result.observed))
        if self.sizing is not None and result.tokens:  # (an aborted step's are empty)
            self.sizing.observe(launch.plan, result.tokens)
        extends = full[: len(req.seq)] == req.seq and len(full) > len(req.seq)
        first = m.tokens == 0
        if result.tokens and not first:
            m.count_step(launch.spawned, result.rows, result.forward_s, len(launch.base))
        if not extends or req.done:
            m.wasted_steps += live
            m.wasted_tokens += len(launch.plan.tree) if live else 0
            return []
        m.hits += launch.spawned
        skip = len(req.seq) - len(launch.base)
        tokens, margins, done = clip_step(
            full[len(req.seq) :], result.margins[skip:], req.produced, req.max_new_tokens, req.stop_ids
        )
        drafts = Drafts(len(full) - 1, result.draft_tokens, result.draft_logprobs) if result.draft_tokens else None
        observe_commit(req.proposers, req.seq[-1], tokens, margins, drafts.after(len(full) - 1, self.vocab) if drafts else None)
        req.seq += tokens
        m.count_tokens(len(tokens), launch.spawned, first, result.forward_s)
        req.done = done
        if drafts is not None:
            req.drafts = drafts
        for other in list(req.launches.values()):
            if not can_extend(other, req.seq):  # built on a refuted prediction: roll back
                req.launches.pop(other.step_id)
                m.wasted_steps += 1
                m.wasted_tokens += len(other.plan.tree)
                self.aborts.add(asyncio.ensure_future(self._abort(other)))
        return [Step(tokens, margins)]

    def _fault(self, req: ReplyState, worker: int, error: Exception) -> None:
        """Retire a failed worker and restart it; its step in flight is forgotten. A worker
        that keeps failing sits out the rest of the request (and gets a fresh start with the
        next one)."""
        req.metrics.faults += 1
        req.failures[worker] = req.failures.get(worker, 0) + 1
        req.errors[worker] = f"{type(error).__name__}: {error}"
        for launch in [x for x in req.launches.values() if x.worker == worker]:
            req.launches.pop(launch.step_id)
        if worker == self.drafter or self.drafter is None:  # (a drafter may have turned verifier meanwhile)
            req.drafting = False
        self.down.add(worker)
        self.busy.pop(worker, None)
        self.cached[worker] = WorkerCache()
        if worker not in self.restarting and req.failures[worker] <= RESTART_ATTEMPTS:
            self.restarting[worker] = asyncio.ensure_future(self._restart(worker))

    async def _restart(self, worker: int) -> None:
        error: Exception | None = None
        for _ in range(RESTART_ATTEMPTS):
            try:
                await asyncio.wait_for(self.transport.restart(worker), self.config.start_timeout)
                error = None
                break
            except Exception as e:  # noqa: BLE001 - retried, then reported
                error = e
        self.restarting.pop(worker, None)
        if error is None:
            self.down.discard(worker)
        if self.current is not None:  # wake the request in progress (it may be waiting for this)
            self.current.events.put_nowait(("restarted", worker, error))

    # --- launching ----------------------------------------------------------------------

    def _schedule(self, req: ReplyState) -> None:
        if req.done:
            return
        if self.drafter is not None and self._free(self.drafter) and not req.drafting:
            self._draft(req)
        for worker in self.verifiers:
            if not self._free(worker):
                continue
            trunk, alternatives, parent = next_trunk(req, self.config.policy == "fanout", self.config.alternatives)
            if trunk is None:
                break
            self._launch(req, worker, trunk, alternatives, parent)
        if not req.launches and all(w in self.down for w in self.verifiers) and not self.restarting:
            if self.drafter is not None and self.drafter not in self.down and not self.draft_model:  # it verifies instead
                self.verifiers, self.drafter = [self.drafter], None
                return self._schedule(req)
            why = "; ".join(f"worker {w}: {e}" for w, e in sorted(req.errors.items()))
            raise WorkerFailed(f"every verifying worker is down and none is restarting ({why})")

    def _free(self, worker: int) -> bool:
        return worker not in self.busy and worker not in self.down

    def _launch(self, req: ReplyState, worker: int, trunk: list[int], alternatives: list[int], parent: Launch | None) -> None:
        c = self.config
        drafted = req.chain[len(req.seq) :][: c.max_chain] if req.chain[: len(req.seq)] == req.seq else []
        covered = subtree_paths(parent, req.seq) if parent is not None else []
        proposers = req.proposers
        below = self._tree_below(req) if self.draft_model else None
        req.metrics.drafter_launches += below is not None and len(below) > 1
        if below is not None and len(below) > 1:  # the drafter's tree starts it
            proposers = [GivenTree(below), *req.proposers[1:]]
        plan = build_launch_tree(req.seq, trunk, alternatives, covered + ([drafted] if drafted else []), proposers,
                                 req.continuation, c.continuation_budget, self.pseudo_nodes)
        if self.sizing is not None:
            plan = self.sizing.size(plan, len(req.seq))
        keep = min(self.cached[worker].reusable(req.seq, every_layer=True), len(req.seq) - 1)
        pipelined = len(self.verifiers) > 1
        predict = c.predict_layer if pipelined else 0
        request = StepRequest(
            req.request_id, self._id(), keep, req.seq[keep:], plan.tree.tokens, plan.tree.parents,
            plan.pseudo_nodes, plan.draft_depth, req.produced, predict, req.drafts.candidates() if req.drafts else [],
            req.max_new_tokens, req.sampling,
        )
        launch = Launch(request.step_id, worker, list(req.seq), plan, request)
        if pipelined and not predict and req.drafts is not None:  # predict from the drafts' confidences now
            guess = predict_from_drafts(plan.tree, req.drafts, len(req.seq) - 1, c.confidence, self.recycling)
            launch.hypotheses = hypotheses(Prediction(request.step_id, *guess), c.alternatives)
        if parent is not None:
            parent.seeded += 1
            launch.spawned = True
            req.metrics.spawned += 1
        req.launches[launch.step_id] = launch
        self.cached[worker] = WorkerCache(req.seq[:keep], keep)
        self.busy[worker] = asyncio.ensure_future(self._run_step(req, launch))

    async def _run_step(self, req: ReplyState, launch: Launch) -> None:
        timeout = self.config.step_timeout
        try:
            handle = await asyncio.wait_for(self.transport.handle(launch.worker), self.config.start_timeout)
            steps = handle.step(launch.request)
            result = await asyncio.wait_for(anext(steps), timeout)
            if not isinstance(result, StepResult):  # the Prediction came first
                req.events.put_nowait(("prediction", launch, result))
                result = await asyncio.wait_for(anext(steps), timeout)
            if not isinstance(result, StepResult):
                raise WorkerFailed(f"worker {launch.worker} answered {type(result).__name__}, not a StepResult")
        except Exception as e:  # noqa: BLE001 - any failure retires the worker
            req.events.put_nowait(("fault", launch.worker, e))
            return
        self.busy.pop(launch.worker, None)
        kept = (launch.base + result.tokens)[: result.cache_length]
        self.cached[launch.worker] = WorkerCache(kept, len(kept))
        req.events.put_nowait(("result", launch, result))

    async def _abort(self, launch: Launch) -> None:
        async def send():
            await (await self.transport.handle(launch.worker)).abort(launch.step_id)

        try:  # a frozen worker is not waited for: its step times out and faults
            await asyncio.wait_for(send(), self.config.step_timeout)
        except Exception:  # noqa: BLE001 - a dead worker needs no abort; its fault is handled
            pass

    # --- asynchronous drafting ----------------------------------------------------------

    def _draft(self, req: ReplyState) -> None:
        if self.draft_model:
            return self._grow_tree(req)
        c, seq = self.config, req.seq
        if req.chain[: len(seq)] == seq and len(req.chain) > len(seq):  # the chain still holds: extend it
            if len(req.chain) - len(seq) >= c.max_chain:
                return
            base = req.chain
        else:  # restart from the committed tokens
            base = list(seq)
        # What the drafter's cache holds of it (nothing, after a restart), never its last token:
        # a draft feeds at least one.
        keep = min(self.cached[self.drafter].reusable(base, every_layer=False), len(base) - 1)
        request = DraftRequest(req.request_id, keep, base[keep:], c.draft_chunk or 2, c.drafter_layer)
        cache = self.cached[self.drafter]  # from `keep` on, its upper layers are stale
        self.cached[self.drafter] = WorkerCache(base[:keep], min(cache.complete, keep))
        req.drafting = True
        self.busy[self.drafter] = asyncio.ensure_future(self._run_draft(req, self.drafter, base, request))

    def _grow_tree(self, req: ReplyState) -> None:
        """The draft model's tree (workers.drafters.draft_tree) grows below the committed root;
        a commit moves its root down the path that came, keeping what was drafted below it."""
        seq, held = req.seq, self.cached[self.drafter].tokens
        if held == seq and req.tree_full:
            return  # it grows again after the next commit
        keep = next((i for i, (a, b) in enumerate(zip(held, seq)) if a != b), min(len(held), len(seq)))
        # The whole tree comes back: a launch takes the part below the committed root, cut to [draft] budget.
        request = DraftRequest(req.request_id, keep, seq[keep:], self.config.draft_chunk or 1, 0, self.drafters.draft.top_k)
        self.cached[self.drafter] = WorkerCache(list(seq), len(seq))  # its committed tokens, once the call is in
        req.drafting = True
        self.busy[self.drafter] = asyncio.ensure_future(self._run_draft(req, self.drafter, list(seq), request))

    async def _run_draft(self, req: ReplyState, worker: int, base: list[int], request: DraftRequest) -> None:
        try:
            handle = await asyncio.wait_for(self.transport.handle(worker), self.config.start_timeout)
            result = await asyncio.wait_for(handle.draft(request), self.config.step_timeout)
        except Exception as e:  # noqa: BLE001
            req.events.put_nowait(("fault", worker, e))
            return
        self.busy.pop(worker, None)
        if not request.width:
            self.cached[worker].tokens = (base + result.tokens)[: result.cache_length]
        req.events.put_nowait(("draft", (base,), result))

    def _drafted(self, req: ReplyState, base: list[int], result: DraftResult) -> None:
        req.drafting = False
        req.metrics.worker_s += result.forward_s
        req.metrics.draft_s += result.forward_s
        req.metrics.drafts += 1
        if result.parents:  # a tree, rooted at base[-1]
            tree = TokenTree.from_parents(result.tokens, result.parents)
            tree.scores = list(result.scores)
            req.tree_base, req.draft_tree, req.tree_full = base, tree, result.grown == 0
        else:
            req.chain = base + result.tokens

    def _tree_below(self, req: ReplyState) -> TokenTree | None:
        """The drafter's tree below the committed root, when the committed tokens went down it."""
        base, tree = req.tree_base, req.draft_tree
        if tree is None or req.seq[: len(base)] != base:
            return None
        node = tree.walk(req.seq[len(base):])
        if node is None:
            return None
        below = subtree(tree, node)
        return best_nodes(below.tokens, below.parents, below.depths, below.scores, self.drafters.draft.budget)

    async def close(self) -> None:
        """Stop restarts in progress and the workers."""
        for task in self.restarting.values():
            task.cancel()
        await asyncio.gather(*self.restarting.values(), return_exceptions=True)
        await self.transport.close()

    # --- end of a request ---------------------------------------------------------------

    async def _drain(self, req: ReplyState) -> None:
        """Abort what is still in flight and wait for the workers to be free again; a
        worker that failed or hangs meanwhile is restarted for the next request."""
        req.done = True
        for launch in list(req.launches.values()):
            self.aborts.add(asyncio.ensure_future(self._abort(launch)))
        if self.aborts:
            await asyncio.wait(self.aborts, timeout=self.config.step_timeout)
            self.aborts.clear()
        if self.busy:
            await asyncio.wait(list(self.busy.values()), timeout=self.config.step_timeout)
        for worker, task in list(self.busy.items()):
            if not task.done():
                task.cancel()
                req.events.put_nowait(("fault", worker, WorkerFailed(f"worker {worker} hung")))
            self.busy.pop(worker)
        while not req.events.empty():
            kind, item, payload = req.events.get_nowait()
            if kind == "fault":
                self._fault(req, item, payload)

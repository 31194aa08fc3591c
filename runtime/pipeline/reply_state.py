"""The coordinator's records (runtime.pipeline.coordinator): a reply in progress, the
steps it launched, what the committed tokens say about each launch's tree, and what
each worker's KV cache holds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from runtime.pipeline.launch_trees import Drafts, LaunchTree
from runtime.pipeline.metrics import Metrics
from workers.drafters.base import Proposer
from workers.messages import Prediction, StepRequest
from workers.tree import TokenTree


@dataclass
class Launch:
    step_id: int
    worker: int
    base: list[int]  # the committed tokens when it was launched (its root last)
    plan: LaunchTree
    request: StepRequest
    hypotheses: list[list[int]] = field(default_factory=list)  # predicted continuations after base
    seeded: int = 0  # launches started on its hypotheses
    spawned: bool = False  # launched on another step's prediction
    started: float = field(default_factory=time.perf_counter)


@dataclass
class ReplyState:
    """The coordinator's view of one reply in progress: its committed tokens, the steps in
    flight (launches), the newest drafts and the asynchronous drafter's chain."""

    request_id: int
    seq: list[int]  # prompt + committed reply tokens
    prompt_len: int
    max_new_tokens: int
    stop_ids: set[int]
    sampling: dict | None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    # The proposers of its launch trees (runtime.pipeline.launch_trees): at the committed root,
    # and after a predicted trunk (name -> proposer); each sees the committed tokens.
    proposers: list[Proposer] = field(default_factory=list)
    continuation: dict[str, Proposer] = field(default_factory=dict)
    drafts: Drafts | None = None  # the newest, for predictions (launch_trees.predict_from_drafts)
    launches: dict[int, Launch] = field(default_factory=dict)
    chain: list[int] = field(default_factory=list)  # async: the drafter's tokens, committed prefix first
    # async with a draft model: its tree (workers.drafters.draft_tree), rooted at the last of `tree_base`
    tree_base: list[int] = field(default_factory=list)
    draft_tree: TokenTree | None = None
    tree_full: bool = False  # the drafter's tree can grow no more until a commit
    drafting: bool = False
    done: bool = False
    failures: dict[int, int] = field(default_factory=dict)  # faults per worker
    errors: dict[int, str] = field(default_factory=dict)  # the last failure of each worker
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def produced(self) -> int:
        return len(self.seq) - self.prompt_len


@dataclass
class WorkerCache:
    """What one worker's KV cache holds, as the coordinator knows it. A verifying step
    writes every layer of its positions; the asynchronous drafter writes only the layers
    below its early-exit layer. So `tokens` fill the first layers, and only the first
    `complete` of them fill every layer: a step may keep those, a draft all of them."""

    tokens: list[int] = field(default_factory=list)
    complete: int = 0

    def reusable(self, seq: list[int], every_layer: bool) -> int:
        """Leading positions of `seq` this cache already holds (in every layer, or in the drafter's)."""
        n = common_prefix(self.tokens, seq)
        return min(n, self.complete) if every_layer else n


def hypotheses(prediction: Prediction, alternatives: int) -> list[list[int]]:
    """The predicted walk, then the same walk ending with each alternative bonus token."""
    best = prediction.tokens
    if not best:
        return []
    return [best] + [[*best[:-1], alt] for alt in prediction.alternatives[:alternatives]]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def node_at(launch: Launch, seq: list[int]) -> int | None:
    """The node of the launch's tree holding the last committed token (None when the
    committed tokens left the tree: its walk cannot commit more)."""
    return launch.plan.tree.walk(seq[len(launch.base) :])


def can_extend(launch: Launch, seq: list[int]) -> bool:
    return node_at(launch, seq) is not None


def subtree_paths(launch: Launch, seq: list[int]) -> list[list[int]]:
    """The launch's tree below the last committed token, as token paths to its leaves: a
    step launched on its prediction verifies these too, so it never commits less."""
    top = node_at(launch, seq)
    if top is None:
        return []
    tree = launch.plan.tree
    children = tree.children()
    leaves = [n for n in range(len(tree)) if not children[n] and top in tree.path_to(n) and n != top]
    return [[tree.tokens[i] for i in tree.path_to(n)[tree.path_to(n).index(top) + 1 :]] for n in leaves]


def next_trunk(req: ReplyState, fanout: bool, alternatives: int) -> tuple[list[int] | None, list[int], Launch | None]:
    """What the next launch should assume: (trunk, alternatives, the launch it extends);
    trunk None = nothing worth launching yet. The longest prediction of a step in flight
    that extends the committed tokens and seeded no launch yet; with `fanout`, each of its
    first 1 + `alternatives` hypotheses seeds a launch of its own, else the others ride as
    leaves of the first's."""
    if not req.launches:
        return [], [], None
    width = 1 + alternatives if fanout else 1
    best: tuple[int, Launch, list[int]] | None = None
    for launch in req.launches.values():
        for hypothesis in launch.hypotheses[launch.seeded : width]:
            predicted = launch.base + hypothesis
            if predicted[: len(req.seq)] == req.seq and len(predicted) > len(req.seq):
                if best is None or len(predicted) > best[0]:
                    best = (len(predicted), launch, predicted[len(req.seq) :])
            break  # hypotheses are seeded in order
    if best is None:
        return None, [], None
    _, launch, trunk = best
    return trunk, [] if fanout else [h[-1] for h in launch.hypotheses[1:]], launch

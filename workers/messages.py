"""Typed records at the coordinator-worker boundary (runtime.pipeline.coordinator <-> workers.decode_worker).

They carry token ids, lengths and step ids only: no model tensor travels per step. Where
they cross a process (the Ray transport) they go as msgpack bytes, tagged with their type:

    encode(StepRequest(...)) -> bytes      decode(bytes) -> StepRequest(...)

A step verifies a token tree rooted at the request's last committed token. The worker's
cache keeps its first `keep` positions; `context` holds the committed tokens after them,
the root last, so a worker that is behind catches up inside the same forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import msgpack


@dataclass
class StepRequest:
    request_id: int
    step_id: int
    keep: int  # cache positions the worker keeps (a prefix of the committed tokens)
    context: list[int]  # committed tokens from `keep` on; the last is the tree's root
    tree_tokens: list[int]  # the token tree, node 0 = the root (runtime.pipeline.launch_trees)
    tree_parents: list[int]
    pseudo_nodes: list[int]  # tree nodes whose pseudo states draft the next tokens
    draft_depth: int | None  # pseudo states per pseudo node (at most the drafter's); 0: none; None: all the drafter's
    reply_index: int  # reply index of the token after the root (seeded sampling)
    predict_layer: int  # after this many layers the worker predicts its walk; 0 = never
    candidates: list[int]  # tokens the prediction may choose besides the tree's own
    max_new_tokens: int
    sampling: dict | None  # configs.schema.SamplingConfig fields; None = greedy


@dataclass
class Prediction:
    """The walk the step will probably take, read at `predict_layer` (early exit over the
    candidate tokens): the accepted drafts, then the bonus token; `alternatives` are the
    next-best bonus tokens."""

    step_id: int
    tokens: list[int]
    alternatives: list[int]


@dataclass
class StepResult:
    step_id: int
    tokens: list[int]  # the accepted drafts, then the bonus token (empty: the step was aborted)
    margins: list[float]
    observed: list[list[int]]  # the target's best tokens after every tree node (token recycling)
    cache_length: int  # the worker's cache length after the step
    draft_tokens: list[list[int]]  # next drafts: top candidates per depth after the last token
    draft_logprobs: list[list[float]]
    forward_s: float  # seconds of compute inside the worker
    rows: float  # the step's rows at their cost: catch-up and tree rows 1 each, pseudo states their share


@dataclass
class DraftRequest:
    """Asynchronous drafting. A chain (`width` 0): keep `keep` cache positions, feed `tokens`
    through the first `layer` layers, then draft `n` tokens one by one.
    A tree (`width` >= 1, workers.drafters.draft_tree): the committed tokens are the first
    `keep` the drafter holds, then `tokens`; grow the tree below the last for `n` forwards
    and send all of it."""

    request_id: int
    keep: int
    tokens: list[int]
    n: int
    layer: int
    width: int = 0


@dataclass
class DraftResult:
    tokens: list[int]  # a chain: the drafted tokens; a tree: its tokens, the root (last committed) first
    cache_length: int
    forward_s: float
    parents: list[int]  # a tree's (empty for a chain)
    scores: list[float]  # a tree's path log-probabilities under the draft model
    grown: int  # forwards run (a tree: 0 when it had nothing left to grow)


MESSAGES = {cls.__name__: cls for cls in (StepRequest, Prediction, StepResult, DraftRequest, DraftResult)}


class MessageError(ValueError):
    pass


def encode(message) -> bytes:
    try:
        return msgpack.packb([type(message).__name__, asdict(message)], use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as e:  # a value msgpack cannot hold (ints past 64 bits)
        raise MessageError(f"cannot encode a {type(message).__name__}: {e}") from None


def decode(data: bytes):
    try:
        name, values = msgpack.unpackb(data, raw=False)
        cls = MESSAGES[name]
        if set(values) != {f.name for f in fields(cls)}:
            raise KeyError(f"fields {sorted(values)}")
        return cls(**values)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
        raise MessageError(f"not a Leapfrog worker message: {e}") from None

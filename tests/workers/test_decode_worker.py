"""The pipeline's decode worker (workers.decode_worker) on the real model: a step catches
up and verifies in one pass, predicts at its layer, survives an abort, and drafts."""

from dataclasses import replace

import pytest

from configs.schema import ModelConfig, PseudoStateModeConfig
from runtime.decoding.autoregressive import generate_ar
from workers.decode_worker import advance, load_worker
from workers.messages import DraftRequest, Prediction, StepRequest, StepResult


@pytest.fixture(scope="module")
def worker(real_model):
    model, _, _ = real_model
    return load_worker(ModelConfig(dtype="float32", device="cpu", max_context=1024), PseudoStateModeConfig(), model=model)


def ar_tokens(worker, ids, n):
    cache = worker.model.new_cache(len(ids) + n + 1)
    return [t for s in generate_ar(worker.model, cache, ids, n, set()) for t in s.tokens]


def first_step(ids, step_id, predict_layer=0, keep=0):
    """Catch up the prompt and verify a root-only tree of its last token."""
    return StepRequest(1, step_id, keep, ids[keep:], [ids[-1]], [-1], [0], None, 0, predict_layer, [], 8, None)


def test_a_step_catches_up_verifies_and_drafts(worker, chat_prompt_ids):
    ids = chat_prompt_ids
    steps = worker.step(first_step(ids, 1))
    assert advance(steps) is None  # no prediction asked for
    result = advance(steps)
    assert isinstance(result, StepResult) and result.tokens == ar_tokens(worker, ids, 1)
    assert result.cache_length == len(ids) and len(result.observed) == 1
    assert len(result.draft_tokens) == worker.drafter.config.k  # the root's pseudo states drafted the next k


def test_a_step_predicts_at_its_layer(worker, chat_prompt_ids):
    steps = worker.step(first_step(chat_prompt_ids, 2, predict_layer=20))
    prediction = advance(steps)
    assert isinstance(prediction, Prediction) and prediction.step_id == 2
    assert isinstance(advance(steps), StepResult)


def test_an_aborted_step_keeps_its_catch_up_tokens(worker, chat_prompt_ids):
    """Abort before the first layer: the committed catch-up tokens still reach the cache."""
    ids = chat_prompt_ids
    worker.abort(3)
    result = advance(worker.step(first_step(ids, 3)))
    assert result.tokens == [] and result.cache_length == len(ids) - 1  # aborted: no tokens
    # The kept positions are right: a plain step from there gives ar's first token.
    steps = worker.step(first_step(ids, 4, keep=len(ids) - 1))
    assert advance(steps) is None
    assert advance(steps).tokens == ar_tokens(worker, ids, 1)


def test_draft_extends_a_chain_in_the_cache(worker, chat_prompt_ids):
    ids = chat_prompt_ids
    result = worker.draft(DraftRequest(1, 0, ids, 3, worker.model.args.n_layers))
    assert result.cache_length == len(ids) + 2  # the feed and two drafts committed, the third not fed yet
    assert result.tokens == ar_tokens(worker, ids, 3)  # all layers: early exit at the top is ar
    with pytest.raises(ValueError, match="at least one token"):
        worker.draft(DraftRequest(1, 0, [], 1, 4))


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_step_drafts_as_deep_as_asked(worker, chat_prompt_ids, depth):
    """StepRequest.draft_depth: that many pseudo states per pseudo node (0: none), the same tokens."""
    ids = chat_prompt_ids
    steps = worker.step(replace(first_step(ids, 10 + depth), draft_depth=depth))
    assert advance(steps) is None
    result = advance(steps)
    assert result.tokens == ar_tokens(worker, ids, 1) and len(result.draft_tokens) == depth

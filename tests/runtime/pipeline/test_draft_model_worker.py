"""The async drafter worker holding a separate draft model ([pipeline] drafter = "draft";
runtime.pipeline.coordinator) on a tiny random Qwen2 pair, with verifiers that have no
pseudo-state drafter: `ar`'s tokens greedy and sampled, in both pipelined modes; the
draft model's trees (workers.drafters.draft_tree) start the verified trees (several
tokens a step when it is the target itself); a full-depth chain draft is the model's
greedy chain; a drafter that fails is restarted and nothing is lost; the draft model's
worker never verifies."""

from __future__ import annotations

import asyncio
import time

import pytest

from configs.schema import DrafterConfigs, PipelineConfig, SamplingConfig
from runtime.decoding.autoregressive import generate_ar
from runtime.pipeline.coordinator import Coordinator
from runtime.pipeline.local_transport import LocalTransport
from runtime.pipeline.transport import WorkerFailed
from workers.decode_worker import DecodeWorker
from workers.messages import DraftRequest
from workers.sampling import chooser
from workers.tree_step import decoding_cache

MAX_CONTEXT = 256
PROMPTS = [[5, 9, 2, 7], list(range(3, 40)), [11] * 6]
SAMPLINGS = [None, SamplingConfig(0.8, 0, 0.9, seed=3)]


@pytest.fixture(scope="module")
def pair(tiny_models):
    return tiny_models("qwen2")[0], tiny_models("qwen2_draft")[0]


def ar_tokens(model, ids, n, sampling=None) -> list[int]:
    cache = decoding_cache(model, MAX_CONTEXT)
    return [t for s in generate_ar(model, cache, ids, n, set(), chooser(sampling, n)) for t in s.tokens]


def make_coordinator(target, draft, worker_class=DecodeWorker, transport_class=LocalTransport, draft_vocabulary=None,
                     **settings):
    config = PipelineConfig(**{"transport": "local", "workers": 2, "step_timeout": 30.0, "drafter": "draft",
                               "draft_chunk": 2, "max_chain": 6, **settings}).validate()

    def make(i: int) -> DecodeWorker:
        model = draft if i == 0 else target  # worker 0 holds the draft model
        return worker_class(model, None, decoding_cache(model, MAX_CONTEXT), draft_vocabulary if i == 0 else None)

    transport = transport_class(config.workers, make)
    coordinator = Coordinator(transport, config, DrafterConfigs(), target.args.vocab_size, pseudo_states=False,
                              draft_model=True)
    return coordinator, transport


def run(coordinator, ids, n, sampling=None, mode="async") -> list[int]:
    async def collect():
        return [t for s in [s async for s in coordinator.generate(ids, n, set(), sampling, mode)] for t in s.tokens]

    return asyncio.run(collect())


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "top-p"])
@pytest.mark.parametrize("mode", ["async", "pipeline"])
def test_a_draft_model_drafter_gives_ar_tokens(pair, sampling, mode):
    target, draft = pair
    coordinator, _ = make_coordinator(target, draft)
    for ids in PROMPTS:
        assert run(coordinator, ids, 30, sampling, mode) == ar_tokens(target, ids, 30, sampling)
        m = coordinator.last_metrics
        assert coordinator.verifiers == [1] and m.faults == 0, coordinator.current or m  # the draft model's worker never verifies
        assert (m.drafts > 0) == (mode == "async")


class SlowVerifier(DecodeWorker):
    """Steps take 50 ms longer: the drafter (a millisecond a call here) always has a tree ready."""

    def step(self, req):
        time.sleep(0.05)
        return super().step(req)


def test_the_target_as_its_own_draft_model_has_every_draft_accepted(pair):
    """Trees drafted by the model that verifies them start the verified trees and their
    best paths are accepted: steps commit several tokens, and the reply is still ar's."""
    target, _ = pair
    coordinator, _ = make_coordinator(target, target, worker_class=SlowVerifier)
    ids = PROMPTS[1]
    assert run(coordinator, ids, 40) == ar_tokens(target, ids, 40)
    m = coordinator.last_metrics
    assert m.steps < 40 and m.tokens == 40 and m.drafter_launches > 0


class DraftSpy(SlowVerifier):
    """Records every token of the trees the drafter sends."""

    drafted: set[int] = set()

    def draft(self, req):
        result = super().draft(req)
        DraftSpy.drafted.update(result.tokens[1:])
        return result


@pytest.mark.parametrize("covers", [True, False], ids=["covers-the-reply", "misses-most"])
def test_a_drafter_with_a_cut_vocabulary_drafts_only_it_and_gives_ar_tokens(pair, covers):
    """The target drafting for itself among some tokens only ([draft] vocab): every tree
    token is one of them; when they hold the reply's tokens most drafts are accepted, and
    either way the reply is ar's."""
    target, _ = pair
    ids = PROMPTS[1]
    ar = ar_tokens(target, ids, 40)
    vocabulary = sorted(set(ar) | {3, 4}) if covers else sorted({3, 4, 5} | set(ar[:2]))
    DraftSpy.drafted = set()
    coordinator, _ = make_coordinator(target, target, worker_class=DraftSpy, draft_vocabulary=vocabulary)
    assert run(coordinator, ids, 40) == ar
    assert DraftSpy.drafted and DraftSpy.drafted <= set(vocabulary)
    if covers:
        assert coordinator.last_metrics.steps < 40


def test_a_full_depth_draft_is_the_models_greedy_chain(pair):
    _, draft = pair
    worker = DecodeWorker(draft, None, decoding_cache(draft, MAX_CONTEXT))
    ids, layers = PROMPTS[1], draft.args.n_layers
    first = worker.draft(DraftRequest(1, 0, ids, 3, layers))
    more = worker.draft(DraftRequest(1, first.cache_length, first.tokens[-1:], 4, layers))
    assert first.tokens + more.tokens == ar_tokens(draft, ids, 7)
    for layer in (0, layers + 1):
        with pytest.raises(ValueError, match="layers"):
            worker.draft(DraftRequest(1, 0, ids, 1, layer))


class DrafterFailing(DecodeWorker):
    """Raises on the 3rd draft call of the run."""

    drafts = 0

    def draft(self, req):
        DrafterFailing.drafts += 1
        if DrafterFailing.drafts == 3:
            raise RuntimeError("injected drafter failure")
        return super().draft(req)


def test_a_failed_draft_model_worker_is_restarted_and_nothing_is_lost(pair):
    target, draft = pair
    DrafterFailing.drafts = 0
    coordinator, transport = make_coordinator(target, draft, worker_class=DrafterFailing, draft_chunk=1)
    ids = PROMPTS[0]
    assert run(coordinator, ids, 30) == ar_tokens(target, ids, 30)
    assert coordinator.last_metrics.faults == 1 and transport.restarts == 1 and DrafterFailing.drafts > 4


class VerifierFailing(DecodeWorker):
    def step(self, req):
        if self.model.args.n_layers > 1:  # the target's worker (the tiny draft model has one layer)
            raise RuntimeError("injected verifier failure")
        return super().step(req)


class Unrestartable(LocalTransport):
    async def restart(self, i):
        self.restarts += 1
        raise RuntimeError("no replica can be made")


def test_the_draft_model_worker_does_not_verify_when_the_verifiers_are_gone(pair):
    target, draft = pair
    assert target.args.n_layers > 1 == draft.args.n_layers
    coordinator, _ = make_coordinator(target, draft, worker_class=VerifierFailing, transport_class=Unrestartable)
    with pytest.raises(WorkerFailed, match="every verifying worker is down"):
        run(coordinator, PROMPTS[0], 10)


def test_one_worker_cannot_hold_a_draft_model_and_verify(pair):
    target, draft = pair
    coordinator, _ = make_coordinator(target, draft, workers=1)
    for mode in ("pipeline", "async"):
        with pytest.raises(ValueError, match="at least 2 workers"):
            coordinator.check_mode(mode)

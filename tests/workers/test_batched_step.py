"""One-token steps of several sequences in one pass (workers.batched_step): each sequence's
logits and cache are the ones it gets alone; the batcher gathers steps from threads."""

import threading

import pytest
import torch

from configs.schema import SamplingConfig
from runtime.decoding.autoregressive import decode_one, generate_ar, prefill
from workers.batched_step import DecodeBatcher, batched_decode
from workers.kv_cache import CacheFullError
from workers.loading import load_model
from workers.sampling import chooser
from workers.tree_step import decoding_cache

PROMPTS = [[1, 9, 400, 33], [7, 7, 7, 7, 7, 7, 7, 7, 7, 12], [2, 5000]]  # different lengths: different positions


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request):
    model, _ = load_model("default", getattr(torch, request.param), "cpu")
    return model


def prefilled(model, prompts):
    caches = [decoding_cache(model, 64) for _ in prompts]
    with torch.inference_mode():
        for cache, ids in zip(caches, prompts):
            prefill(model, cache, ids)
    return caches


@pytest.mark.real_model
def test_a_batched_step_is_each_sequence_alone(model):
    alone, together = prefilled(model, PROMPTS), prefilled(model, PROMPTS)
    tokens = [11, 22, 33]
    with torch.inference_mode():
        for _ in range(3):  # three steps: the positions move on
            expected = torch.stack([decode_one(model, c, t) for c, t in zip(alone, tokens)])
            got = batched_decode(model, together, tokens)
            assert torch.equal(got, expected)  # bit for bit, float32 and bfloat16 alike
            tokens = expected.argmax(-1).tolist()
    for a, b in zip(alone, together):
        assert a.length == b.length and torch.equal(a.k[:, :, :, : a.length], b.k[:, :, :, : b.length])
        with torch.inference_mode():  # a step alone takes the plain (fused) forward: the same logits
            assert torch.equal(batched_decode(model, [b], [tokens[0]])[0], decode_one(model, a, tokens[0]))


@pytest.mark.real_model
def test_threads_decoding_at_once_share_passes_and_get_their_own_replies(model):
    """Four threads, one batcher: greedy and sampled replies equal each prompt's alone, and
    the passes gathered the steps of the replies decoding."""
    batcher = DecodeBatcher(model)
    prompts = PROMPTS + [[3, 4, 5, 6, 7]]
    samplings = [None, None, SamplingConfig(0.8, 0, 0.95, seed=5), SamplingConfig(1.0, 20, 1.0, seed=6)]

    def reply(cache, ids, sampling, decode=None):
        steps = generate_ar(model, cache, ids, 24, set(), chooser(sampling, 24), decode)
        return [t for s in (batcher.decoding(steps) if decode else steps) for t in s.tokens]

    alone = [reply(decoding_cache(model, 64), ids, s) for ids, s in zip(prompts, samplings)]
    together: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        cache = decoding_cache(model, 64)
        start.wait()
        together[i] = reply(cache, prompts[i], samplings[i], batcher.decode)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    st = batcher.stats
    assert st.steps == 4 * 23 and st.largest == 4 and st.passes < st.steps / 2  # passes gathered the active replies


@pytest.mark.real_model
def test_a_full_cache_fails_its_own_step_only(model):
    batcher = DecodeBatcher(model)
    full = model.new_cache(4)  # exactly the prompt
    with torch.inference_mode():
        prefill(model, full, [1, 2, 3, 4])
        with pytest.raises(CacheFullError):
            batcher.decode(model, full, 5)
        roomy = prefilled(model, PROMPTS[:1])[0]
        assert batcher.decode(model, roomy, 5).shape == (model.args.vocab_size,)
    with pytest.raises(ValueError, match="another model"):
        batcher.decode(object(), roomy, 5)


@pytest.mark.real_model
def test_a_reply_that_stops_asking_holds_no_one_up(model):
    """A reply counted active but not stepping (its reader is slow) delays the others' passes
    by GATHER_S at most; they run alone and finish with their own replies."""
    batcher = DecodeBatcher(model)
    held = batcher.decoding(generate_ar(model, decoding_cache(model, 64), PROMPTS[0], 24, set(), None, batcher.decode))
    next(held)  # active from here on, and not asking for a step
    other = generate_ar(model, decoding_cache(model, 64), PROMPTS[1], 12, set(), None, batcher.decode)
    alone = generate_ar(model, decoding_cache(model, 64), PROMPTS[1], 12, set())
    assert [s.tokens for s in batcher.decoding(other)] == [s.tokens for s in alone]
    assert batcher.stats.largest == 1 and batcher.stats.passes == 11
    held.close()
    assert batcher._active == 0  # closing a reply ends its count

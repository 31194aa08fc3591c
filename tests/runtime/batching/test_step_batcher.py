"""The batcher (runtime.batching.step_batcher): it gathers the steps of replies decoding at
once in several threads into shared passes, each reply getting the reply it gets alone;
lanes tell each other their load; the pass cost is learnt (runtime.batching.pass_cost)."""

import threading

import pytest
import torch

from configs.schema import SamplingConfig
from runtime.batching import step_batcher
from runtime.batching.step_batcher import StepBatcher
from runtime.decoding.autoregressive import generate_ar, prefill, prefill_hidden
from workers.kv_cache import CacheFullError
from workers.sampling import Greedy, chooser
from workers.tree import chain
from workers.tree_sizing import Load
from workers.tree_step import decoding_cache, prepare_tree_step

from batched_passes import PROMPTS, model, prefilled  # noqa: F401 - model: a fixture


@pytest.mark.real_model
def test_threads_decoding_at_once_share_passes_and_get_their_own_replies(model):
    """Four threads, one batcher: greedy and sampled replies equal each prompt's alone, and
    the passes gathered the steps of the replies decoding."""
    batcher = StepBatcher(model)
    lanes = [batcher.lane() for _ in range(4)]
    prompts = PROMPTS + [[3, 4, 5, 6, 7]]
    samplings = [None, None, SamplingConfig(0.8, 0, 0.95, seed=5), SamplingConfig(1.0, 20, 1.0, seed=6)]

    def reply(cache, ids, sampling, lane=None):
        steps = generate_ar(model, cache, ids, 24, set(), chooser(sampling, 24), lane)
        return [t for s in (lane.decoding(steps) if lane else steps) for t in s.tokens]

    alone = [reply(decoding_cache(model, 64), ids, s) for ids, s in zip(prompts, samplings)]
    together: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        cache = decoding_cache(model, 64)
        start.wait()
        together[i] = reply(cache, prompts[i], samplings[i], lanes[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    st = batcher.stats
    # every step counted, prefills among them; one pass gathered all four replies
    assert st.steps == 4 * 24 and st.rows == 4 * 23 + sum(map(len, prompts)) and st.largest == 4


@pytest.mark.real_model
def test_a_long_prompt_shares_passes_in_chunks_with_one_prefill_s_numbers(model, monkeypatch):
    """Through a lane, a prompt longer than PROMPT_CHUNK rows runs in passes of that many rows
    (Lane.lead_in): its final states, last logits and cache are bit for bit one prefill's."""
    monkeypatch.setattr(step_batcher, "PROMPT_CHUNK", 4)
    prompt, lane = list(range(300, 315)), StepBatcher(model).lane()
    one, chunked = decoding_cache(model, 64), decoding_cache(model, 64)
    with torch.inference_mode():
        h, logits = prefill_hidden(model, one, prompt)
        h_chunked, logits_chunked = prefill_hidden(model, chunked, prompt, lane)
    assert torch.equal(h_chunked, h) and torch.equal(logits_chunked, logits)
    assert chunked.length == one.length == 15 and torch.equal(chunked.k[:, :, :, :15], one.k[:, :, :, :15])
    assert lane.batcher.stats.passes == 4  # rows 0-3, 4-7, 8-10, then the last 4 with the head


@pytest.mark.real_model
def test_a_full_cache_fails_its_own_step_only(model):
    lane = StepBatcher(model).lane()
    full = model.new_cache(4)  # exactly the prompt
    with torch.inference_mode():
        prefill(model, full, [1, 2, 3, 4])
        with pytest.raises(CacheFullError):
            lane.decode(model, full, 5)
        roomy = prefilled(model, PROMPTS[:1])[0]
        assert lane.decode(model, roomy, 5).shape == (model.args.vocab_size,)
    with pytest.raises(ValueError, match="another model"):
        lane.decode(object(), roomy, 5)


@pytest.mark.real_model
def test_a_reply_that_stops_asking_holds_no_one_up(model):
    """A reply counted active but not stepping (its reader is slow) delays the others' passes
    by GATHER_S at most; they run alone and finish with their own replies."""
    batcher = StepBatcher(model)
    slow, quick = batcher.lane(), batcher.lane()
    held = slow.decoding(generate_ar(model, decoding_cache(model, 64), PROMPTS[0], 24, set(), None, slow))
    next(held)  # active from here on, and not asking for a step
    assert quick.others() == Load(1.0, 1.0)  # what a plain step adds to a pass
    other = generate_ar(model, decoding_cache(model, 64), PROMPTS[1], 12, set(), None, quick)
    alone = generate_ar(model, decoding_cache(model, 64), PROMPTS[1], 12, set())
    assert [s.tokens for s in quick.decoding(other)] == [s.tokens for s in alone]
    assert batcher.stats.largest == 1 and batcher.stats.passes == 2 + 11  # two prefills, then quick's steps alone
    held.close()
    assert batcher._active() == 0 and quick.others() == Load()  # closing a reply ends its count


def test_a_reply_left_unfinished_counts_no_more_once_the_next_starts():
    lane = StepBatcher(None).lane()
    first = lane.decoding(iter([1, 2]))
    assert next(first) == 1 and lane.active
    second = lane.decoding(iter([3, 4]))
    assert next(second) == 3
    first.close()  # closed late, while the second decodes: the lane stays active for it
    assert lane.active
    second.close()
    assert not lane.active


def test_a_prefill_is_not_load_on_the_others_passes(model):
    """A lane in its prefill (prompt rows) tells the others what its next step will add to
    their passes (a plain step), not its prompt's rows: counted as load, a long prompt made
    every other reply's tree look cheap."""
    batcher = StepBatcher(model)
    prefilling, other = batcher.lane(), batcher.lane()
    prompt = list(range(100, 140))
    cache = decoding_cache(model, 64)
    held = prefilling.decoding(iter([None]))
    next(held)  # active
    step = prepare_tree_step(model, cache, chain(prompt[-1], []), Greedy(), 0, prompt[:-1])
    assert step.segment.prompt_rows == len(prompt) - 1
    with torch.inference_mode():
        prefilling.forward(step.segment, expected_tokens=3.0, rows=50.0)
    assert other.others() == Load(1.0, 1.0)
    held.close()


def test_pass_cost_fits_passes_and_stays_solvable_when_rows_equal_steps():
    """PassCost fits ms = a + b * rows + c * steps; thousands of passes whose rows always
    equal their steps (every step plain) leave rows and steps collinear, and it must still
    solve (a decayed ridge made the solve fail mid-pass and killed every reply in it)."""
    from runtime.batching.pass_cost import PassCost

    cost = PassCost()
    for i in range(3000):
        n = 2 + i % 7
        cost.observe(5.0 + 1.5 * n, float(n), n)  # a + (b + c) * n
    assert cost.ready and cost(4.0, 4) == pytest.approx(11.0, abs=0.05)
    fitted = PassCost()
    for i in range(200):
        rows, steps = 2.0 + i % 9, 2 + i % 4
        fitted.observe(3.0 + 0.5 * rows + 1.0 * steps, rows, steps)
    assert fitted(10.0, 3) == pytest.approx(11.0, abs=0.05)

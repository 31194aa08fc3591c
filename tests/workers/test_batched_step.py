"""Steps of several sequences in one pass (workers.batched_step): each sequence's results
and cache are the ones it gets alone, for one-token steps, token trees and pseudo states.
(The batcher that gathers them from threads: tests/runtime/batching.)"""

import dataclasses

import pytest
import torch

from runtime.decoding.autoregressive import decode_one
from workers.batched_step import batched_forward, one_token, prompt_segment
from workers.drafters.loading import load, shipped_weights
from workers.kernels.choice import NATIVE
from workers.model import set_kernels
from workers.sampling import Greedy
from workers.tree import TokenTree, chain
from workers.tree_step import decoding_cache, prepare_tree_step

from batched_passes import PROMPTS, model, prefilled  # noqa: F401 - model: a fixture
from refined import with_refinement


def segments(model, caches):
    """On caches[0..2]: a one-token step, a token tree, and a tree with hidden-transfer pseudo
    states (refined: their rows change from layer to layer); on caches[3..4], empty: a
    prefill, and a first hidden-transfer step (its prompt rows caught up, its root and pseudo
    states)."""
    ht = load(shipped_weights("default", "ht"), model.args)
    adapted = with_refinement(ht.first(2), (25, 28))
    tree = TokenTree([12, 40, 41, 50, 51], [-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], [0.0, -0.5, -1.0, -1.2, -2.0])
    trees = [prepare_tree_step(model, caches[1], tree, Greedy(), 3),
             prepare_tree_step(model, caches[2], chain(9, [8, 7]), Greedy(), 1, (), adapted, [0, 1])]
    first = prepare_tree_step(model, caches[4], chain(77, []), Greedy(), 0, list(range(300, 309)), ht.first(2), [0])
    return [one_token(model, caches[0], 11)] + [t.segment for t in trees] + [
        prompt_segment(model, caches[3], list(range(200, 212))), first.segment], trees


@pytest.mark.real_model
@pytest.mark.parametrize("ragged", ["native call", "op by op"])
def test_a_batched_pass_is_each_sequence_alone(model, ragged):
    """One-token steps, trees and pseudo states of three sequences in one pass: bit for bit
    what each gets alone (its final states, its logits, its cache), float32 and bfloat16,
    through the native ragged layer and through the layer op by op."""
    if ragged == "op by op":
        set_kernels(model, dataclasses.replace(NATIVE, ragged_decoder_layer=None))
    try:
        fresh = lambda: [decoding_cache(model, 64), decoding_cache(model, 64)]  # noqa: E731
        alone, together = prefilled(model, PROMPTS) + fresh(), prefilled(model, PROMPTS) + fresh()
        with torch.inference_mode():
            expected = [batched_forward(model, [seg])[0] for seg in segments(model, alone)[0]]
            batch, trees = segments(model, together)
            got = batched_forward(model, batch)
        for (h, logits), (h0, logits0) in zip(got, expected):
            assert torch.equal(h, h0) and torch.equal(logits, logits0)
        # the pseudo states joined the third and the fifth; the prompt rows shared the pass
        assert [h.shape[1] for h, _ in got] == [1, 5, 3 + 2 * 2, 12, 9 + 1 + 2]
        assert [seg.prompt_rows for seg in batch] == [0, 0, 0, 11, 9]
        for a, b in zip(alone, together):
            assert torch.equal(a.k[:, :, :, : a.length + 12], b.k[:, :, :, : b.length + 12])
        outcome = trees[1].finish(*got[2])  # a batched step is accepted as one alone is
        assert outcome.drafts is not None and together[2].length == len(PROMPTS[2]) + len(outcome.path)
    finally:
        set_kernels(model, NATIVE)


@pytest.mark.real_model
def test_one_token_steps_in_a_pass_are_each_alone(model):
    alone, together = prefilled(model, PROMPTS), prefilled(model, PROMPTS)
    tokens = [11, 22, 33]
    with torch.inference_mode():
        for _ in range(3):  # three steps: the positions move on
            expected = torch.stack([decode_one(model, c, t) for c, t in zip(alone, tokens)])
            got = torch.cat([logits for _, logits in batched_forward(model, [one_token(model, c, t) for c, t in zip(together, tokens)])])
            for c in together:
                c.commit(1)
            assert torch.equal(got, expected)
            tokens = expected.argmax(-1).tolist()
    for a, b in zip(alone, together):
        assert a.length == b.length and torch.equal(a.k[:, :, :, : a.length], b.k[:, :, :, : b.length])

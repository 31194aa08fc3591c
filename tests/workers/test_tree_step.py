"""One decoding step (workers.tree_step): acceptance on hand-built targets, the masks and
drafts of pseudo states, and the whole step against its parts on a tiny model."""

import pytest
import torch

from workers.drafters.loading import load, shipped_weights
from workers.drafters.pseudo_forward import pseudo_mask, run_to_end
from workers.loading import load_model
from workers.sampling import Greedy
from workers.tree import TokenTree, root_only
from workers.tree_step import TREE_HEADROOM, accept, decoding_cache, next_drafts, step_mask, tree_step

from refined import with_refinement


def accept_greedy(tree, targets):
    """accept() with greedy choices whose argmax after node i is targets[i]; checks the
    committed tokens (path drafts + bonus) and returns the path."""
    logits = torch.nn.functional.one_hot(torch.tensor(targets), 128).float()
    path, tokens, margins = accept(tree, logits, Greedy(), 0)
    assert tokens == [tree.tokens[i] for i in path[1:]] + [targets[path[-1]]]
    assert margins == [1.0] * len(tokens)
    return path


def test_accept_greedy_on_hand_built_targets():
    #        0
    #      /   \
    #     1(a)  2(b)
    #     |      |
    #     3(c)   4(d)
    tree = TokenTree([100, 10, 11, 12, 13], [-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], [0.0] * 5)
    assert accept_greedy(tree, [11, 99, 13, 99, 50]) == [0, 2, 4]  # b then d, bonus 50
    assert accept_greedy(tree, [10, 12, 99, 77, 99]) == [0, 1, 3]
    assert accept_greedy(tree, [10, 55, 99, 99, 99]) == [0, 1]  # c rejected
    assert accept_greedy(tree, [42, 0, 0, 0, 0]) == [0]  # nothing accepted
    assert accept_greedy(root_only(5), [6]) == [0]


def test_pseudo_mask_layout():
    node_mask = TokenTree([0, 1, 2], [-1, 0, 0], [0, 1, 1], [0.0] * 3).ancestor_mask()
    m = pseudo_mask(node_mask, groups=[2], k=2, pseudo_attention=True)
    assert m.shape == (5, 5)
    assert torch.equal(m[:3, 3:], torch.zeros(3, 2, dtype=torch.bool))  # nodes never see pseudo states
    assert m[3].tolist() == [True, False, True, True, False]  # pseudo (2, 1): root, node 2, itself
    assert m[4].tolist() == [True, False, True, True, True]  # pseudo (2, 2) also sees pseudo (2, 1)
    off = pseudo_mask(node_mask, groups=[2], k=2, pseudo_attention=False)
    assert off[4].tolist() == [True, False, True, False, True]


def test_next_drafts_fall_back_to_the_deepest_drafted_ancestor():
    # A chain 0 -> 1 -> 2 -> 3; pseudo states (k = 3) for nodes 0 and 1 only.
    tree = TokenTree([100, 10, 11, 12], [-1, 0, 1, 2], [0, 1, 2, 3], [0.0, -1.0, -2.0, -3.0])
    drafts = torch.arange(2 * 3 * 5, dtype=torch.float).reshape(2, 3, 5)  # (groups, k, vocab)
    groups = [0, 1]
    assert torch.equal(next_drafts(tree, [0, 1], groups, drafts), drafts[1])  # own drafts
    assert torch.equal(next_drafts(tree, [0], groups, drafts), drafts[0])
    assert torch.equal(next_drafts(tree, [0, 1, 2], groups, drafts), drafts[1][1:])  # node 1's, one deeper
    assert torch.equal(next_drafts(tree, [0, 1, 2, 3], groups, drafts), drafts[1][2:])
    assert next_drafts(tree, [0, 1, 2, 3], [0], drafts[:1]) is None  # 3 beyond the root's k = 3


def test_step_mask_is_causal_catch_up_then_the_tree():
    tree = TokenTree.from_parents([1, 2, 3], [-1, 0, 0])
    m = step_mask(2, tree)
    assert m[:2, :2].tolist() == [[True, False], [True, True]]
    assert m[2:, :2].all() and not m[:2, 2:].any()
    assert torch.equal(m[2:, 2:], tree.ancestor_mask())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_step_with_catch_up_equals_a_prefill_then_a_step(tiny_models, kind):
    """Catching up c tokens inside the step that verifies the tree gives the same logits,
    committed tokens and cache as committing them first."""
    model, _ = tiny_models(kind)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.args.vocab_size, (10,), generator=g).tolist()
    tree = TokenTree.from_parents([prompt[-1], 4, 5, 6], [-1, 0, 0, 1])
    with torch.inference_mode():
        together = decoding_cache(model, 64)
        one = run_to_end(tree_step(model, together, tree, Greedy(), 0, prompt[:-1]))
        apart = decoding_cache(model, 64)
        run_to_end(tree_step(model, apart, root_only(prompt[0]), Greedy(), 0))  # commits prompt[0] alone
        run_to_end(tree_step(model, apart, root_only(prompt[-2]), Greedy(), 0, prompt[1:-2]))
        two = run_to_end(tree_step(model, apart, tree, Greedy(), 0))
    torch.testing.assert_close(one.logits, two.logits, atol=1e-4, rtol=0)
    assert one.tokens == two.tokens and one.path == two.path
    assert together.length == apart.length == len(prompt) - 1 + len(one.path)
    end = together.length
    torch.testing.assert_close(together.k[:, :, :, :end], apart.k[:, :, :, :end], atol=1e-5, rtol=0)
    assert together.max_len == 64 + TREE_HEADROOM


def test_bfloat16_prompt_positions_get_the_same_bits_in_prefill_and_in_catch_up(chat_prompt_ids):
    """Prompt positions are computed by their own path (prompt rows), reply positions as
    one-row steps: ar's prefill and decode steps, and a tree step that catches up the prompt
    and a reply token (a pipeline worker's first step), leave bit-identical caches and logits."""
    from runtime.decoding.autoregressive import decode_one, prefill
    from workers.loading import load_model

    model, _ = load_model("default", torch.bfloat16, "cpu", "native")
    prompt = chat_prompt_ids
    with torch.inference_mode():
        ar = decoding_cache(model, 128)
        first = prefill(model, ar, prompt).argmax().item()
        second = decode_one(model, ar, first).argmax().item()
        third_logits = decode_one(model, ar, second)
        worker = decoding_cache(model, 128)
        out = run_to_end(tree_step(model, worker, root_only(second), Greedy(), 2, [*prompt, first]))
    assert worker.length == ar.length == len(prompt) + 2
    end = ar.length
    assert torch.equal(worker.k[:, :, :, :end], ar.k[:, :, :, :end]) and torch.equal(worker.v[:, :, :, :end], ar.v[:, :, :, :end])
    assert torch.equal(out.logits[0], third_logits)


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pseudo_states_change_the_drafts_and_leave_the_real_rows_bit_identical(dtype, chat_prompt_ids):
    """What the pseudo states do between the layers is theirs alone. A step whose drafter
    refines them at every later layer gives every real row (the catch-up tokens and the
    tree's nodes) the same bits as the drafter without: its logits, final states and cache.
    Its drafts are different."""
    model, _ = load_model("default", getattr(torch, dtype), "cpu")
    plain = load(shipped_weights("default", "ht"), model.args)
    adapted = with_refinement(plain, range(plain.config.layer + 1, model.args.n_layers))
    prompt = chat_prompt_ids
    tree = TokenTree.from_parents([prompt[-1], 40, 41, 50, 51], [-1, 0, 0, 1, 2])
    outcomes, caches = [], []
    for drafter in (plain, adapted):
        cache = decoding_cache(model, 128)
        with torch.inference_mode():
            outcomes.append(run_to_end(tree_step(model, cache, tree, Greedy(), 0, prompt[:-1], drafter, [0, 1, 3])))
        caches.append(cache)
    (a, b), (ca, cb) = outcomes, caches
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    assert a.path == b.path and a.tokens == b.tokens and ca.length == cb.length
    assert torch.equal(ca.k[:, :, :, : ca.length], cb.k[:, :, :, : cb.length])
    assert torch.equal(ca.v[:, :, :, : ca.length], cb.v[:, :, :, : cb.length])
    assert not torch.equal(a.drafts, b.drafts)

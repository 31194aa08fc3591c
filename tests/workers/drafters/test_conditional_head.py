"""The conditional head (workers.drafters.conditional_head): the shift it gives a node's
children on top of the successor prior, by the definition on a tiny vocabulary, its file,
and the trees it makes, on hand-built inputs."""

import math

import numpy as np
import pytest
import torch

from workers.drafters.conditional_head import ConditionalHead, ConditionalHeadConfig, ConditionedHead
from workers.drafters.loading import DrafterWeightsError
from workers.drafters.successor_prior import SuccessorPrior
from workers.model import ModelArgs
from workers.tree import build_dynamic_tree

V, DIM = 8, 4
ARGS = ModelArgs(architecture="llama", vocab_size=V, dim=DIM, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=4,
                 intermediate_size=8, norm_eps=1e-5)


def prior() -> SuccessorPrior:
    return SuccessorPrior.count([[1, 2, 1, 2, 3, 4], [2, 1, 5]], V, weights=[0.5, 1.0], alpha=0.5)


def head(seed: int = 0, zero: bool = False) -> ConditionalHead:
    torch.manual_seed(seed)
    h = ConditionalHead(ARGS, ConditionalHeadConfig(hidden=6, depths=2, candidates=V))
    if not zero:
        torch.nn.init.normal_(h.w_out.weight, std=0.5)
    return h


def embeddings() -> torch.Tensor:
    return torch.randn(V, DIM, generator=torch.Generator().manual_seed(1))


def drafts() -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    lp = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(2)), -1)
    top = torch.topk(lp, 3)
    return lp.numpy(), (top.values.numpy(), top.indices.numpy())


def test_a_zero_head_gives_the_priors_children():
    lp, top = drafts()
    step = ConditionedHead(head(zero=True), embeddings(), prior()).for_step(torch.randn(2, DIM))
    for parent in (1, 2, 6):
        scores, tokens = step.children(lp, top, parent, 1, 3)
        want_scores, want_tokens = prior().children(lp, top, parent, 1, 3)
        assert tokens == want_tokens and scores == pytest.approx(want_scores, abs=1e-6)


def test_the_shift_is_the_lm_head_on_the_shifted_state_times_the_prior():
    """With every token a candidate, log q' is exactly log softmax over the vocabulary of
    E (n + g(n, e(p))) + w log P(c | p): what training optimises."""
    h, E, states = head(), embeddings(), torch.randn(2, DIM, generator=torch.Generator().manual_seed(3))
    pr = prior()
    lp = torch.log_softmax(states @ E.T, -1)  # the drafts the states make
    step = ConditionedHead(h, E, pr).for_step(states)
    scale = 1 / math.sqrt(float(E.double().pow(2).mean()))
    for depth in (1, 2):
        top = torch.topk(lp[depth - 1], V)
        for parent in (1, 2, 6):
            scores, tokens = step.children(lp[depth - 1].numpy(), (top.values.numpy(), top.indices.numpy()), parent, depth, V)
            g = h.shift(states[depth - 1 : depth], E[parent : parent + 1] * scale, torch.tensor([depth - 1]))[0]
            succ, log_prior, unseen = pr.row(parent)
            bias = torch.full((V,), unseen)
            bias[torch.from_numpy(succ).long()] = torch.from_numpy(log_prior)
            want = torch.log_softmax((states[depth - 1] + g) @ E.T + pr.weights[depth - 1] * bias, -1).detach()
            assert sorted(tokens) == list(range(V))
            assert np.array(scores) == pytest.approx(want[tokens].numpy(), abs=1e-4)
            assert tokens[0] == int(want.argmax())


def test_children_depend_on_the_parent_and_trees_follow():
    h, E, pr = head(seed=4), embeddings(), prior()
    states = torch.randn(2, DIM, generator=torch.Generator().manual_seed(5))
    step = ConditionedHead(h, E, pr).for_step(states)
    lp = torch.log_softmax(states @ E.T, -1)
    top = torch.topk(lp[1], 3)
    by_parent = {p: step.children(lp[1].numpy(), (top.values.numpy(), top.indices.numpy()), p, 2, 3) for p in range(V)}
    assert len({tuple(t) for _, t in by_parent.values()}) > 1
    tree = build_dynamic_tree(0, lp, 6, 3, step)
    for node in range(1, len(tree)):  # every node is its parent's child under the head
        parent, depth = tree.parents[node], tree.depths[node]
        top = torch.topk(lp[depth - 1], 3)
        scores, tokens = step.children(lp[depth - 1].numpy(), (top.values.numpy(), top.indices.numpy()),
                                       tree.tokens[parent], depth, 3)
        assert tree.tokens[node] in tokens
        assert tree.scores[node] == pytest.approx(tree.scores[parent] + scores[tokens.index(tree.tokens[node])])


def test_depths_beyond_the_head_keep_the_prior():
    lp, top = drafts()
    step = ConditionedHead(head(), embeddings(), prior()).for_step(torch.randn(1, DIM))  # one depth of states
    assert step.children(lp, top, 2, 2, 3) == prior().children(lp, top, 2, 2, 3)


def test_file_round_trip_and_a_wrong_model(tmp_path):
    h = head()
    h.save(tmp_path / "head.safetensors", extra={"steps": 3})
    back = ConditionalHead.load(tmp_path / "head.safetensors", ARGS)
    assert back.config == h.config and back.training_summary == {"steps": 3}
    for name, t in h.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)
    other = ModelArgs(**{**ARGS.__dict__, "vocab_size": V + 1})
    with pytest.raises(DrafterWeightsError, match="trained for a model"):
        ConditionalHead.load(tmp_path / "head.safetensors", other)
    with pytest.raises(DrafterWeightsError, match="do not exist"):
        ConditionalHead.load(tmp_path / "none.safetensors", ARGS)


def test_a_bfloat16_lm_head_is_read_in_place_with_its_values():
    E = embeddings().to(torch.bfloat16)
    in_place, widened = ConditionedHead(head(), E, prior()), ConditionedHead(head(), E.float(), prior())
    tokens = np.array([0, 3, 7, 3])
    assert np.array_equal(in_place.rows(tokens), widened.rows(tokens)) and in_place.rows(5).shape == (DIM,)
    lp, top = drafts()
    states = torch.randn(2, DIM)
    assert in_place.for_step(states).children(lp, top, 2, 1, 3) == widened.for_step(states).children(lp, top, 2, 1, 3)

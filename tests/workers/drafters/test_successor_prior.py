"""The successor prior (workers.drafters.successor_prior): counts, the rescored
distribution, the children it gives a node, and its file, on hand-built inputs."""

import math

import numpy as np
import pytest
import torch

from workers.drafters.successor_prior import SuccessorPrior

V = 6


def hand_counted() -> SuccessorPrior:
    # pairs: 1>2 twice, 2>1 twice, 2>3 once; (3, 2) spans two sequences and is not a pair
    return SuccessorPrior.count([[1, 2, 1, 2, 3], [2, 1]], V, weights=[0.5, 1.0], alpha=0.5)


def test_counts_are_smoothed_bigrams_within_sequences():
    prior = hand_counted()
    succ, log_prior, unseen = prior.row(1)
    assert succ.tolist() == [2] and log_prior[0] == pytest.approx(math.log(2.5 / (2 + 0.5 * V)))
    assert unseen == pytest.approx(math.log(0.5 / (2 + 0.5 * V)))
    succ, log_prior, _ = prior.row(2)
    assert succ.tolist() == [1, 3]  # by token id
    assert np.exp(log_prior).tolist() == pytest.approx([2.5 / (3 + 3), 1.5 / (3 + 3)])
    assert len(prior.row(3)[0]) == 0 and prior.row(3)[2] == pytest.approx(math.log(1 / V))  # never a parent: uniform
    capped = SuccessorPrior.count([[1, 2, 1, 2, 3], [2, 1], [2, 0], [2, 0], [2, 0]], V, weights=[1.0], max_successors=2,
                                  alpha=0.5)
    assert capped.row(2)[0].tolist() == [0, 1]  # the two most frequent (3 and 2 times), by token id
    with pytest.raises(ValueError, match="token ids"):
        SuccessorPrior.count([[1, V]], V, weights=[1.0])


def dense_rescored(prior: SuccessorPrior, lp: np.ndarray, parent: int, depth: int) -> np.ndarray:
    """log q over the whole vocabulary, by the definition."""
    succ, log_prior, unseen = prior.row(parent)
    bias = np.full(V, unseen, dtype=np.float64)
    bias[succ] = log_prior
    score = lp + prior.weights[depth - 1] * bias
    return score - np.log(np.exp(score).sum())


def test_rescored_distribution_is_normalised_and_matches_its_definition():
    prior = hand_counted()
    lp = torch.log_softmax(torch.tensor([0.1, 2.0, -1.0, 1.5, 0.3, -0.5]), -1).numpy()
    for parent, depth in [(1, 1), (2, 2), (2, 1)]:
        want = dense_rescored(prior, lp.astype(np.float64), parent, depth)
        assert np.exp(want).sum() == pytest.approx(1.0)
        succ, succ_lq, shift = prior.rescore(lp, parent, depth)
        assert succ_lq.tolist() == pytest.approx(want[succ].tolist(), abs=1e-5)
        others = np.setdiff1d(np.arange(V), succ)
        assert (lp[others] + shift).tolist() == pytest.approx(want[others].tolist(), abs=1e-5)
    assert len(prior.rescore(lp, 1, 3)[0]) == 0  # no weight for depth 3: the drafts as they are
    sparse = np.full(V, -np.inf, dtype=np.float32)
    sparse[[0, 5]] = np.log(0.5)  # drafts with two candidates only, neither a successor of 1
    assert len(prior.rescore(sparse, 1, 1)[0]) == 0


def test_children_are_the_best_of_the_successors_and_the_top_drafts():
    prior = hand_counted().with_weights([3.0])
    lp = torch.log_softmax(torch.tensor([0.0, 0.0, -2.0, 1.0, 0.5, 0.0]), -1).numpy()
    top = (np.array([lp[3], lp[4]], dtype=np.float32), np.array([3, 4]))
    scores, tokens = prior.children(lp, top, parent=2, depth=1, k=3)
    want = dense_rescored(prior, lp.astype(np.float64), 2, 1)
    # candidates: successors 1 and 3 of token 2, and the top drafts 3 and 4
    assert tokens == sorted([1, 3, 4], key=lambda t: -want[t])
    assert scores == pytest.approx([want[t] for t in tokens], abs=1e-5)
    assert tokens[0] == 1  # the prior lifts token 1 (after 2 twice) over the draft's favourite
    assert prior.children(lp, top, parent=5, depth=1, k=2) == (pytest.approx(top[0].tolist()), [3, 4])  # no successors


def test_file_round_trip(tmp_path):
    prior = hand_counted()
    prior.save(tmp_path / "p.safetensors", extra={"note": "test"})
    back = SuccessorPrior.load(tmp_path / "p.safetensors", V)
    assert back.weights == prior.weights
    for t in range(V):
        assert back.row(t)[0].tolist() == prior.row(t)[0].tolist()
    with pytest.raises(ValueError, match="counted over 6 tokens"):
        SuccessorPrior.load(tmp_path / "p.safetensors", V + 1)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a successor prior"):
        SuccessorPrior.load(tmp_path / "other.safetensors", V)
    with pytest.raises(FileNotFoundError):
        SuccessorPrior.load(tmp_path / "missing.safetensors", V)

"""A drafter's vocabulary cut to some tokens (workers.drafters.draft_vocabulary) on a tiny
random Qwen2 pair: its log-probabilities are the full head's logits over those tokens
alone, normalized among them; the best drafts map back to token ids; the whole-vocabulary
view is -inf elsewhere; bad id lists are refused. A draft model (mode `draft`) and the
drafter worker's growing tree draft only those tokens and still give `ar`'s tokens."""

from __future__ import annotations

import pytest
import torch

from configs.schema import SamplingConfig
from workers.drafters.draft_model import DraftModelProposer
from workers.drafters.draft_tree import GrowingDraftTree
from workers.drafters.draft_vocabulary import DraftVocabulary
from workers.tree_step import decoding_cache

from tests.workers.drafters.test_draft_model import MAX_CONTEXT, ar_tokens, decode, prompts


@pytest.fixture(scope="module")
def pair(tiny_models):
    return tiny_models("qwen2")[0], tiny_models("qwen2_draft")[0]


def some_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return sorted(torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def hidden(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        cache = model.new_cache(len(tokens))
        return model.run_layers(model.embed(torch.tensor([tokens])), model.context(torch.arange(len(tokens)), cache))[0]


def test_logprobs_are_the_full_heads_logits_normalized_over_the_vocabulary(pair):
    _, draft = pair
    ids = some_ids(draft.args.vocab_size, 40)
    vocabulary = DraftVocabulary(draft, ids)
    assert vocabulary.size == 40 and vocabulary.ids == ids
    h = hidden(draft, [5, 9, 2, 7, 11])
    with torch.inference_mode():
        logits = draft.lm_head(draft.norm(h)).float()
        lp = vocabulary.logprobs(h)
    torch.testing.assert_close(lp, torch.log_softmax(logits[:, ids], -1), atol=1e-5, rtol=1e-5)
    values, tokens = vocabulary.top(lp, 3)
    for row in range(lp.shape[0]):
        best = torch.topk(logits[row, ids], 3).indices.tolist()
        assert tokens[row] == [ids[i] for i in best]
        assert values[row] == pytest.approx(lp[row, best].tolist())
    whole = vocabulary.whole(lp)
    assert whole.shape == (lp.shape[0], draft.args.vocab_size)
    assert torch.equal(whole[:, ids], lp)
    outside = [t for t in range(draft.args.vocab_size) if t not in set(ids)]
    assert torch.isneginf(whole[:, outside]).all()


def test_no_cut_is_the_models_own_head(pair):
    _, draft = pair
    for ids in (None, list(range(draft.args.vocab_size))):
        vocabulary = DraftVocabulary(draft, ids)
        assert vocabulary.head is draft.lm_head and vocabulary.ids is None and vocabulary.size == draft.args.vocab_size
        lp = torch.zeros(2, draft.args.vocab_size)
        assert vocabulary.whole(lp) is lp


@pytest.mark.parametrize("ids", [[], [3, 2], [4, 4], [-1, 5], [5, 100_000]], ids=["empty", "unsorted", "repeated", "negative", "too-big"])
def test_bad_ids_are_refused(pair, ids):
    _, draft = pair
    with pytest.raises(ValueError, match="sorted distinct token ids"):
        DraftVocabulary(draft, ids)


@pytest.mark.parametrize("sampling", [None, SamplingConfig(0.8, 0, 0.9, seed=3)], ids=["greedy", "top-p"])
def test_a_draft_model_drafts_only_its_vocabulary_and_gives_ar_tokens(pair, sampling):
    target, draft = pair
    ids = some_ids(target.args.vocab_size, 24, seed=1)
    proposer = DraftModelProposer(draft, MAX_CONTEXT + 64, 3, 2, budget=8, vocabulary=ids)
    drafted: set[int] = set()
    propose = proposer.propose

    def spy(proposal):
        propose(proposal)
        drafted.update(proposal.tree.tokens[1:])

    proposer.propose = spy
    for prompt in prompts(target.args.vocab_size):
        assert decode(target, proposer, prompt, 30, sampling=sampling, check=True)[0] == ar_tokens(target, prompt, 30, sampling=sampling)
    assert drafted and drafted <= set(ids)


def test_a_growing_tree_drafts_only_its_vocabulary(pair):
    _, draft = pair
    ids = some_ids(draft.args.vocab_size, 16, seed=2)
    tree = GrowingDraftTree(draft, decoding_cache(draft, 128), 2, 64, DraftVocabulary(draft, ids))
    tree.advance(0, [5, 9, 2, 7, 11, 3])
    assert tree.grow(6) == 6
    drafted = tree.tree()
    # the root's 2 children, then 5 calls of 2 nodes x 2 children
    assert len(drafted.tokens) == 1 + 2 + 5 * 2 * 2 and set(drafted.tokens[1:]) <= set(ids)
    for node in range(1, len(drafted.tokens)):  # each child scored among the vocabulary alone
        path, x = [], node
        while x > 0:
            path.append(drafted.tokens[x])
            x = drafted.parents[x]
        path = path[::-1]
        with torch.inference_mode():
            logits = draft.lm_head(draft.norm(hidden(draft, tree.committed + path[:-1])[-1:])).float()[0]
        lp = torch.log_softmax(logits[ids], -1)[ids.index(path[-1])]
        assert drafted.scores[node] == pytest.approx(drafted.scores[drafted.parents[node]] + float(lp), abs=1e-4)

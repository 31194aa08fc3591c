"""Draft-model speculation (workers.drafters.draft_model) on a tiny random Qwen2 pair of one
vocabulary: `ar`'s tokens, greedy and sampled, as a chain and as a tree, with and without
a tree sizer; the draft cache always equal to a fresh run over the committed tokens it
holds, after rejections too; every node scored as a cache-free run of its path; drafting
with the target itself accepts every draft; a draft model of another vocabulary or
tokenizer is refused, naming both checkpoints."""

import shutil

import pytest
import torch

from configs.schema import ConfigError, ModelConfig, SamplingConfig
from runtime.decoding.autoregressive import generate_ar
from runtime.decoding.speculative import SpeculativeDecoder
from workers.drafters.base import Proposal
from workers.drafters.draft_model import DraftModelProposer, check_same_vocabulary, draft_checkpoint, load_draft_model
from workers.loading import ModelLoadError
from workers.sampling import chooser
from workers.tree import root_only
from workers.tree_sizing import CostCurve, StepCost, TreeSizer
from workers.tree_step import decoding_cache

MAX_CONTEXT = 200


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (1, 4, 13, 30)]


def ar_tokens(model, ids, n, stop_ids=frozenset(), sampling=None) -> list[int]:
    cache = decoding_cache(model, MAX_CONTEXT)
    return [t for s in generate_ar(model, cache, ids, n, set(stop_ids), chooser(sampling, n)) for t in s.tokens]


def check_cache(proposer: DraftModelProposer) -> None:
    """The draft cache holds exactly what a fresh run of the draft model over the first
    `length` committed tokens writes."""
    cache, model = proposer.cache, proposer.model
    n = cache.length
    assert n <= len(proposer.tokens)
    if n == 0:
        return
    fresh = model.new_cache(n)
    with torch.inference_mode():
        model(torch.tensor([proposer.tokens[:n]]), model.context(torch.arange(n), fresh))
    fresh.commit(n)
    torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v[:, :, :, :n], atol=1e-5, rtol=1e-5)


def decode(target, proposer, ids, n, stop_ids=frozenset(), sampling=None, sizer=None, check=False):
    """The speculative loop with the draft model; (tokens, tokens per step)."""
    decoder = SpeculativeDecoder(target, decoding_cache(target, MAX_CONTEXT), [proposer], sizer)
    tokens, per_step = [], []
    for step in decoder.generate(ids, n, set(stop_ids), chooser(sampling, n)):
        tokens += step.tokens
        per_step.append(len(step.tokens))
        if check:
            check_cache(proposer)
    return tokens, per_step


def flat_sizer() -> TreeSizer:
    return TreeSizer(CostCurve({0: StepCost((1, 64), (1.0, 1.0))}))  # every node pays: the sizer's ratings alone


@pytest.fixture(scope="module")
def pair(tiny_models):
    return tiny_models("qwen2")[0], tiny_models("qwen2_draft")[0]


SAMPLINGS = [None, SamplingConfig(0.8, 0, 0.9, seed=3), SamplingConfig(1.0, 20, 1.0, seed=4)]


@pytest.mark.parametrize("top_k,depth", [(1, 4), (3, 3)])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "top-p", "top-k"])
@pytest.mark.parametrize("drafter", ["other", "target"])
def test_draft_mode_gives_ar_tokens(pair, top_k, depth, sampling, drafter):
    target, draft = pair
    proposer = DraftModelProposer(target if drafter == "target" else draft, MAX_CONTEXT + 64, depth, top_k, budget=10)
    accepted = 0
    for ids in prompts(target.args.vocab_size):
        for n in (1, 2, 7, 40):
            ar = ar_tokens(target, ids, n, sampling=sampling)
            tokens, per_step = decode(target, proposer, ids, n, sampling=sampling, check=n == 40)
            assert tokens == ar, (ids, n)
            accepted += sum(per_step) - len(per_step)
    if drafter == "target":
        assert accepted > 0  # the drafts were used (a random small draft model is rarely right)


def test_stop_tokens_end_the_reply_where_ar_ends_it(pair):
    target, draft = pair
    for drafter in (target, draft):
        proposer = DraftModelProposer(drafter, MAX_CONTEXT + 64, 4, 2, budget=8)
        for ids in prompts(target.args.vocab_size):
            full = ar_tokens(target, ids, 30)
            stop = {full[9]}
            ar = ar_tokens(target, ids, 30, stop)
            assert ar[-1] == full[9] and len(ar) <= 10
            assert decode(target, proposer, ids, 30, stop)[0] == ar


def test_a_draft_equal_to_the_target_accepts_every_draft(pair):
    """The target drafting for itself (its own cache): every step commits the whole chain and
    the bonus token, and the draft cache keeps the accepted rows it ran (a truncate)."""
    target, _ = pair
    depth = 4
    proposer = DraftModelProposer(target, MAX_CONTEXT + 64, depth, 1, budget=depth + 1)
    for ids in prompts(target.args.vocab_size):
        tokens, per_step = decode(target, proposer, ids, 41, check=True)
        assert tokens == ar_tokens(target, ids, 41)
        assert per_step == [1] + [depth + 1] * 8  # the first step: the prompt, then its bonus token
        # All the chain's rows but the last drafted token's (never run) were kept.
        assert proposer.cache.length == len(proposer.tokens) - 1


def test_sampled_tree_rows_off_the_first_branch_are_kept_right(pair):
    """Sampling (top-k 3) through a tree of the target's own top 3 (every node expanded at
    depth 1 and 2, the best three at depth 3) accepts two drafts or three, often through
    second and third candidates: rows that are not the first after the committed ones,
    moved down (KVCache.keep) all the same."""
    target, _ = pair
    proposer = DraftModelProposer(target, MAX_CONTEXT + 64, 3, 3, budget=40)
    kept, keep = [], proposer.cache.keep
    proposer.cache.keep = lambda rows: (kept.append(list(rows)), keep(rows))
    for ids in prompts(target.args.vocab_size)[1:]:
        sampling = SamplingConfig(1.0, 3, 1.0, seed=len(ids))
        tokens, per_step = decode(target, proposer, ids, 41, sampling=sampling, check=True)
        assert tokens == ar_tokens(target, ids, 41, sampling=sampling)
        assert min(per_step[1:-1]) == 3 and max(per_step) == 4
    assert any(rows != list(range(len(rows))) for rows in kept)


@pytest.mark.parametrize("drafter", ["other", "target"])
def test_sized_trees_give_ar_tokens(pair, drafter):
    target, draft = pair
    proposer = DraftModelProposer(target if drafter == "target" else draft, MAX_CONTEXT + 64, 3, 2, budget=8)
    for ids in prompts(target.args.vocab_size):
        sizer = flat_sizer()
        tokens, _ = decode(target, proposer, ids, 40, sizer=sizer, check=True)
        assert tokens == ar_tokens(target, ids, 40)
        assert sizer.acceptance.scale  # the draft nodes were rated by their scores, per depth


def test_every_node_is_scored_as_a_fresh_run_of_its_path(pair):
    """A node's score minus its parent's is the draft log-probability of its token after the
    committed tokens and its path, run from scratch: the tree rows' masks and positions."""
    target, draft = pair
    proposer = DraftModelProposer(draft, MAX_CONTEXT + 64, 3, 3, budget=100)
    ids = prompts(draft.args.vocab_size)[2]
    proposer.start(ids[:-1])
    proposer.skip(ids[-1], None)
    proposal = Proposal(root_only(5))
    proposer.propose(proposal)
    tree = proposal.tree
    assert len(tree) == 1 + 3 + 9 + 9 and tree.max_depth == 3 and proposer.calls == 3
    children = tree.children()
    for node in range(len(tree)):
        if not children[node]:
            continue
        path = [tree.tokens[i] for i in tree.path_to(node)]
        seq = ids + path  # the committed tokens, the root (5), the path below it
        with torch.no_grad():
            logits = draft(torch.tensor([seq]), draft.context(torch.arange(len(seq))))[0, -1]
        lp = torch.log_softmax(logits.float(), -1)
        for child in children[node]:
            assert tree.scores[child] - tree.scores[node] == pytest.approx(float(lp[tree.tokens[child]]), abs=2e-4)
    torch.testing.assert_close(proposal.logprobs[0], torch.log_softmax(
        draft(torch.tensor([ids + [5]]), draft.context(torch.arange(len(ids) + 1)))[0, -1].float(), -1), atol=2e-4, rtol=0)


def test_min_prob_stops_drafting_early(pair):
    target, draft = pair
    ids = prompts(draft.args.vocab_size)[1]
    proposer = DraftModelProposer(draft, MAX_CONTEXT + 64, 5, 1, budget=8, min_prob=0.999)  # a random model is never that sure
    proposer.start(ids[:-1])
    proposer.skip(ids[-1], None)
    proposal = Proposal(root_only(3))
    proposer.propose(proposal)
    assert proposer.calls == 1 and len(proposal.tree) == 2  # one depth drafted, none expanded


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_models, tiny_checkpoint):
    target, other = tiny_models("qwen2")[0], tiny_models("qwen2_other_vocab")[0]
    target_folder, other_folder = tiny_checkpoint("qwen2"), tiny_checkpoint("qwen2_other_vocab")
    with pytest.raises(ModelLoadError, match=r"the draft model 'small' cannot draft for 'big': its vocabulary has 192 "
                                             r"tokens, the target's 160"):
        check_same_vocabulary(target, target_folder, "big", other, other_folder, "small")
    config = ModelConfig(checkpoint=str(target_folder), dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match=f"draft model '{other_folder}' cannot draft for '{target_folder}'"):
        load_draft_model(str(other_folder), target, target_folder, config)
    assert load_draft_model(str(target_folder), target, target_folder, config) is target  # itself: no second copy
    draft = load_draft_model(str(tiny_checkpoint("qwen2_draft")), target, target_folder, config)
    assert draft.args.dim == 32 and draft.args.vocab_size == 160


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]")


def test_a_draft_model_of_another_tokenizer_is_refused(tiny_models, tiny_checkpoint, tmp_path):
    """Same vocabulary size, other tokens: refused where both folders have a tokenizer."""
    model = tiny_models("qwen2")[0]
    folders = {}
    for name, words in (("big", ["a", "b", "c"]), ("small", ["a", "c", "b"]), ("same", ["a", "b", "c"])):
        folders[name] = tmp_path / name
        shutil.copytree(tiny_checkpoint("qwen2"), folders[name])
        word_tokenizer(words).save_pretrained(folders[name])
    with pytest.raises(ModelLoadError, match="'small' cannot draft for 'big': their tokenizers differ"):
        check_same_vocabulary(model, folders["big"], "big", model, folders["small"], "small")
    check_same_vocabulary(model, folders["big"], "big", model, folders["same"], "same")


def test_auto_is_the_paired_draft_model():
    assert draft_checkpoint("auto", "qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"
    assert draft_checkpoint("some/folder", "default") == "some/folder"
    with pytest.raises(ConfigError, match="no draft model is paired with the checkpoint 'default'.*qwen2.5-coder-0.5b for qwen2.5-coder-1.5b"):
        draft_checkpoint("auto", "default")

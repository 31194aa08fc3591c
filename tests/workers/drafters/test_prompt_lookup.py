"""Prompt lookup (workers.drafters.prompt_lookup): the match it copies from, and the context it keeps."""

import torch

import random

from workers.drafters.prompt_lookup import NgramIndex, PromptLookupDrafter, lookup


def test_lookup_prefers_the_longest_then_latest_match():
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    assert lookup(context, 1, 3, 4) == [9, 2, 6, 7]  # "6 7" last seen at 5-6, followed by 9 2 6 7
    assert lookup(context + [9], 1, 3, 2) == [2, 6]  # "6 7 9" at 5-7
    assert lookup([1, 2, 3, 4], 1, 3, 5) == []  # nothing repeats
    assert lookup([4, 1, 2, 4], 1, 3, 5) == [1, 2, 4]  # a 1-gram, continuation up to the end
    assert lookup([3, 3], 2, 3, 5) == []  # below min_ngram


def test_prompt_lookup_drafter_tracks_committed_tokens():
    d = PromptLookupDrafter(1, 3, 3)
    d.start([10, 11, 12, 13])
    tree = d.propose(11)  # context ... 13, 11: "11" matched at 1, followed by 12 13 11
    assert tree.tokens == [11, 12, 13, 11] and tree.parents == [-1, 0, 1, 2] and tree.depths == [0, 1, 2, 3]
    d.observe(tree, [0, 1], torch.zeros(4, 1, dtype=torch.long))  # 11 and 12 accepted
    assert d.context == [10, 11, 12, 13, 11, 12]
    assert d.propose(99).tokens == [99]  # no match: the root alone


def test_the_index_answers_as_the_scan_does():
    """NgramIndex.after equals lookup over tokens + [root] on random contexts that grow (small
    vocabularies: many matches, of every length, some running into the root)."""
    rng = random.Random(0)
    for vocab, min_n, max_n, depth in [(3, 1, 3, 4), (5, 2, 3, 3), (8, 1, 1, 5), (4, 1, 4, 10)]:
        index, tokens = NgramIndex(min_n, max_n), []
        for _ in range(60):
            grown = [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]
            index.extend(grown)
            tokens += grown
            for root in range(vocab):
                assert index.after(root, depth) == lookup(tokens + [root], min_n, max_n, depth)

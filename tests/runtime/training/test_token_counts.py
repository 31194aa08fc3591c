"""Reply token counts (runtime.training.token_counts): the most frequent ids, ties to the
lower id; ShareGPT's training replies counted once per tokenizer (cached), the held-out
conversations and the other turns never, special tokens first; and the engine's [draft]
vocab read from them once for the engine and its siblings."""

from __future__ import annotations

import pytest
import torch

from configs.schema import ConfigError, DraftModelConfig, DrafterConfigs, ModelConfig
from runtime.engine import Engine
from runtime.training import token_counts
from runtime.training.token_counts import most_frequent, reply_token_counts


def test_most_frequent_ties_go_to_the_lower_id():
    counts = torch.tensor([0, 5, 2, 5, 0, 1])
    assert most_frequent(counts, 2).tolist() == [1, 3]
    assert most_frequent(counts, 4).tolist() == [1, 2, 3, 5]
    assert most_frequent(counts, 6).tolist() == list(range(6))
    for size in (0, 7):
        with pytest.raises(ValueError):
            most_frequent(counts, size)


class LetterTokenizer:
    """Token id = letter index + 2 (a..h); ids 0 and 1 are special (added) tokens."""

    all_special_ids = [0]
    calls = 0

    def get_vocab(self) -> dict[str, int]:
        return {"<s>": 0, "<|im_end|>": 1} | {chr(97 + i): i + 2 for i in range(8)}

    def get_added_vocab(self) -> dict[str, int]:
        return {"<|im_end|>": 1}

    def __call__(self, texts: list[str], add_special_tokens: bool):
        assert not add_special_tokens
        LetterTokenizer.calls += 1
        return {"input_ids": [[ord(c) - 95 for c in text] for text in texts]}


def test_training_replies_are_counted_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path))
    conversations = [
        {"id": "1", "conversations": [{"from": "human", "value": "hhhhhhh"}, {"from": "gpt", "value": "abb"}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "ccc"}, {"from": "human", "value": "dd"}, {"from": "gpt", "value": None}]},
    ]
    monkeypatch.setattr(token_counts, "train_conversations", lambda: conversations)
    LetterTokenizer.calls = 0
    counts = reply_token_counts(LetterTokenizer(), 10, progress=False)
    # a: 1, b: 2, c: 3; the human turns never count; the special tokens above the rest
    assert counts.tolist() == [4, 4, 1, 2, 3, 0, 0, 0, 0, 0]
    assert most_frequent(counts, 3).tolist() == [0, 1, 4]
    monkeypatch.setattr(token_counts, "train_conversations", lambda: pytest.fail("counted again"))
    assert torch.equal(reply_token_counts(LetterTokenizer(), 10, progress=False), counts)
    assert LetterTokenizer.calls == 1 and list((tmp_path / "token_counts").glob("*.pt"))


def test_the_engines_draft_vocabulary_is_the_most_frequent_reply_tokens(monkeypatch):
    engine = Engine(ModelConfig(dtype="float32", device="cpu", max_context=64), DrafterConfigs(draft=DraftModelConfig(vocab=0)))
    vocab = engine.model.args.vocab_size
    counts = torch.arange(vocab).flip(0)  # token 0 most frequent
    monkeypatch.setattr("runtime.engine.reply_token_counts", lambda tokenizer, size: counts[:size])
    assert engine.draft_vocabulary() is None
    for size, expected in ((100, list(range(100))), (vocab, None), (vocab + 5, None)):
        engine.set_drafter_config("draft", DraftModelConfig(vocab=size))
        assert engine.draft_vocabulary() == expected
    monkeypatch.setattr("runtime.engine.reply_token_counts", lambda tokenizer, size: pytest.fail("counted again"))
    engine.set_drafter_config("draft", DraftModelConfig(vocab=100))
    assert engine.draft_vocabulary() == engine.sibling().draft_vocabulary() == list(range(100))  # read once, shared
    engine.set_drafter_config("draft", DraftModelConfig(vocab=-1))
    with pytest.raises(ConfigError, match=r"\[draft\] vocab"):
        engine.draft_vocabulary()

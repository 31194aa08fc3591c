"""TextStream: streamed deltas concatenate to the full decode and never show half a character."""

from __future__ import annotations

import random

import pytest

from runtime.text.stream import REPLACEMENT, TextStream

pytestmark = pytest.mark.real_model

TEXTS = {
    "emoji": "Hello 👋🏽 world 🇫🇷! Family: 👨‍👩‍👧‍👦, thumbs 👍.",
    "cjk": "日本語のテキスト、中文文本和한국어 텍스트。",
    "accents": "Café naïve façade — Ångström, Øresund, señor, Ελληνικά, Привет",
    "spaces": "   leading spaces\n\n\tand tabs\n  trailing  \n",
    "code": 'def f(x):\n    if x:\n        return {"a": [1, 2]}\n    return None  # done\n',
    "mixed": "Q: 2+2?\nA: 4 ✅\n```\n  λx. x → 🚀\n```",
}


def stream(tokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    """Push ids in chunks of the given sizes; returns every delta (flush last)."""
    s = TextStream(tokenizer)
    deltas, pos = [], 0
    for size in chunks:
        deltas.append(s.push(ids[pos : pos + size]))
        pos += size
    assert pos == len(ids)
    deltas.append(s.flush())
    return deltas


def random_chunks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    chunks = []
    while n > 0:
        size = min(n, rng.randint(1, 4))
        chunks.append(size)
        n -= size
    return chunks


def check(tokenizer, ids: list[int], chunks: list[int]) -> None:
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    deltas = stream(tokenizer, ids, chunks)
    assert "".join(deltas) == expected
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in d for d in deltas), deltas


@pytest.fixture(scope="module")
def tokenizer(real_model):
    return real_model[1]


@pytest.mark.parametrize("name", list(TEXTS))
def test_one_token_at_a_time(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name])
    assert tokenizer.decode(ids) == TEXTS[name]  # the tokenizer round-trips these texts
    check(tokenizer, ids, [1] * len(ids))


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunks(tokenizer, name, seed):
    ids = tokenizer.encode(TEXTS[name])
    check(tokenizer, ids, random_chunks(len(ids), seed))


def test_whole_text_in_one_push(tokenizer):
    ids = tokenizer.encode(TEXTS["emoji"])
    deltas = stream(tokenizer, ids, [len(ids)])
    assert deltas == [TEXTS["emoji"], ""]


def test_multibyte_characters_span_tokens(tokenizer):
    """The texts really exercise the hold-back: some single tokens decode to an incomplete character."""
    ids = tokenizer.encode(TEXTS["emoji"] + TEXTS["cjk"])
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    s = TextStream(tokenizer)
    assert any(s.push([i]) == "" for i in ids)  # at least one push had to wait


def test_special_tokens_are_skipped(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_end != tokenizer.unk_token_id
    ids = tokenizer.encode("Bonjour 🇫🇷 café") + [im_end] + tokenizer.encode("\nnext 日本") + [im_start, im_end]
    for chunks in ([1] * len(ids), random_chunks(len(ids), 5)):
        deltas = stream(tokenizer, ids, chunks)
        text = "".join(deltas)
        assert text == "Bonjour 🇫🇷 café\nnext 日本"
        assert "<|im_end|>" not in text and "<|im_start|>" not in text
        assert not any(REPLACEMENT in d for d in deltas)


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer.encode("ok 👋🏽")
    # Cut inside the emoji: the last token leaves its final character incomplete.
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith(REPLACEMENT))
    ids = ids[:cut]
    expected = tokenizer.decode(ids)
    s = TextStream(tokenizer)
    pushed = "".join(s.push([i]) for i in ids)
    assert REPLACEMENT not in pushed  # held back while incomplete
    tail = s.flush()
    assert pushed + tail == expected
    assert tail.endswith(REPLACEMENT)
    assert s.flush() == ""  # nothing left after a flush


def test_empty_push(tokenizer):
    s = TextStream(tokenizer)
    assert s.push([]) == ""
    assert s.push(tokenizer.encode("hi")) == "hi"
    assert s.push([]) == ""
    assert s.flush() == ""

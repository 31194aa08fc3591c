"""Engines side by side (runtime.bench.engines_ab): one row per (mode, engine), each against
that engine's own `ar`, with tau and the identical-to-ar count."""

from __future__ import annotations

from types import SimpleNamespace

from runtime.bench.engines_ab import compare_engines
from runtime.bench.prompts import Prompt
from runtime.decoding.steps import Step


class StepEngine:
    """Replies 1, 2, 3, ... to any prompt: `ar` a token a step, `pairs` two a step (every
    second pair wrong when `wrong`)."""

    def __init__(self, wrong: bool = False):
        self.wrong, self.calls = wrong, []

    def encode_chat(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def mode(self, name: str):
        return SimpleNamespace()

    def steps(self, prompt_ids, mode, max_new_tokens, sampling=None):
        self.calls.append(mode)
        yield Step([1], [1.0])  # the prefill's token
        tokens = list(range(2, max_new_tokens + 1))
        size = 1 if mode == "ar" else 2
        for i in range(0, len(tokens), size):
            chunk = tokens[i:i + size]
            if self.wrong and i % 4:
                chunk = [-t for t in chunk]
            yield Step(chunk, [1.0] * len(chunk))


def test_rows_per_mode_and_engine():
    engines = {"right": StepEngine(), "wrong": StepEngine(wrong=True)}
    prompts = [Prompt("a", "x", "hello"), Prompt("b", "y", "world")]
    rows = compare_engines(engines, ["pairs"], prompts, 9, log=lambda line: None)
    assert [(r["mode"], r["engine"]) for r in rows] == [("pairs", "right"), ("pairs", "wrong")]
    right, wrong = rows
    assert right["tau"] == wrong["tau"] == 2.0  # 8 tokens after the prefill, two a step
    assert right["identical_to_ar"] == 2 and wrong["identical_to_ar"] == 0 and right["prompts"] == 2
    assert right["speedup_vs_ar"] > 0 and right["tokens_per_s"] > 0
    # Warm-up first (every mode on every engine), then prompt by prompt: ar, then the mode, per engine.
    assert engines["right"].calls == ["ar", "pairs", "ar", "pairs", "ar", "pairs"]

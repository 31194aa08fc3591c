"""Benchmark prompts: the first turns of a Spec-Bench-format JSONL file
({"question_id", "category", "turns"} per line). The 480 Spec-Bench prompts ship in
runtime/bench/data/spec_bench/ and are the default."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class BenchInputError(ValueError):
    pass


@dataclass
class Prompt:
    question_id: int | str
    category: str
    text: str


def default_prompts_path() -> Path:
    return Path(str(resources.files("runtime.bench") / "data" / "spec_bench" / "question.jsonl"))


def load_prompts(path: str | Path, limit: int | None = None, per_category: int | None = None) -> list[Prompt]:
    """First turns of a Spec-Bench-format JSONL file, optionally the first N per category, then the first N."""
    path = Path(path)
    if not path.is_file():
        raise BenchInputError(f"prompt file {path} does not exist")
    prompts, seen = [], defaultdict(int)
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = Prompt(row["question_id"], row["category"], row["turns"][0])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise BenchInputError(
                f"{path}:{lineno}: expected {{\"question_id\", \"category\", \"turns\": [...]}} ({e})"
            ) from None
        if not isinstance(prompt.text, str) or not prompt.text:
            raise BenchInputError(f"{path}:{lineno}: the first turn must be a non-empty string")
        if per_category is not None and seen[prompt.category] >= per_category:
            continue
        seen[prompt.category] += 1
        prompts.append(prompt)
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise BenchInputError(f"{path} holds no prompts")
    return prompts

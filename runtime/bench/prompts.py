"""Benchmark prompts: the first turns of a Spec-Bench-format JSONL file
({"question_id", "category", "turns"} per line). Two sets ship in runtime/bench/data/ and
go by name: `spec-bench` (480 prompts, 13 categories: the default) and `humaneval` (164
code prompts, for the code models)."""

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


PROMPT_SETS = {"spec-bench": "spec_bench", "humaneval": "humaneval"}  # name -> folder in data/


def default_prompts_path(name: str = "spec-bench") -> Path:
    return Path(str(resources.files("runtime.bench") / "data" / PROMPT_SETS[name] / "question.jsonl"))


def prompts_path(name_or_path: str | None) -> Path:
    """A shipped set by name (PROMPT_SETS; None: spec-bench) or a JSONL file's path."""
    if name_or_path is None or name_or_path in PROMPT_SETS:
        return default_prompts_path(name_or_path or "spec-bench")
    return Path(name_or_path)


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

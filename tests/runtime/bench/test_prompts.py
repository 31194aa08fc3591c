"""The benchmark's prompt sets (runtime.bench.prompts): the shipped sets by name, files by path."""

import json
from pathlib import Path

import pytest

from runtime.bench.prompts import BenchInputError, Prompt, default_prompts_path, load_prompts, prompts_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- load_prompts

ROWS = [
    {"question_id": 1, "category": "a", "turns": ["a1", "follow-up"]},
    {"question_id": 2, "category": "a", "turns": ["a2"]},
    {"question_id": 3, "category": "b", "turns": ["b1"]},
    {"question_id": 4, "category": "a", "turns": ["a3"]},
    {"question_id": "q5", "category": "c", "turns": ["c1"]},
    {"question_id": 6, "category": "b", "turns": ["b2"]},
    {"question_id": 7, "category": "b", "turns": ["b3"]},
]


@pytest.fixture
def prompt_file(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", ROWS)


def ids(prompts: list[Prompt]) -> list:
    return [p.question_id for p in prompts]


def test_load_prompts_all(prompt_file):
    prompts = load_prompts(prompt_file)
    assert ids(prompts) == [1, 2, 3, 4, "q5", 6, 7]
    assert prompts[0] == Prompt(1, "a", "a1")  # first turn only


def test_load_prompts_limit(prompt_file):
    assert ids(load_prompts(prompt_file, limit=3)) == [1, 2, 3]
    assert ids(load_prompts(prompt_file, limit=100)) == [1, 2, 3, 4, "q5", 6, 7]


def test_load_prompts_per_category(prompt_file):
    assert ids(load_prompts(prompt_file, per_category=1)) == [1, 3, "q5"]
    assert ids(load_prompts(prompt_file, per_category=2)) == [1, 2, 3, "q5", 6]


def test_load_prompts_per_category_then_limit(prompt_file):
    assert ids(load_prompts(prompt_file, limit=4, per_category=2)) == [1, 2, 3, "q5"]
    assert ids(load_prompts(prompt_file, limit=2, per_category=1)) == [1, 3]


def test_load_prompts_skips_blank_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n   \n" + json.dumps(ROWS[2]) + "\n\n")
    assert ids(load_prompts(path)) == [1, 3]


def test_load_prompts_errors(tmp_path):
    with pytest.raises(BenchInputError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"question_id": 9, "category": "x"}) + "\n")
    with pytest.raises(BenchInputError, match=r"bad.jsonl:2:"):
        load_prompts(bad)


def test_bundled_prompts():
    prompts = load_prompts(default_prompts_path(), per_category=1)
    assert len(prompts) >= 2
    assert len({p.category for p in prompts}) == len(prompts)
    assert all(isinstance(p.text, str) and p.text for p in prompts)


def test_the_shipped_sets_load_by_name():
    spec = load_prompts(prompts_path(None))
    assert len(spec) == 480 and len({p.category for p in spec}) == 13
    assert prompts_path("spec-bench") == prompts_path(None)
    code = load_prompts(prompts_path("humaneval"))
    assert len(code) == 164 and {p.category for p in code} == {"humaneval"}
    assert code[0].question_id == "humaneval-0" and "def has_close_elements" in code[0].text
    assert len(load_prompts(prompts_path("humaneval"), per_category=3)) == 3


def test_any_other_name_is_a_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question_id": 1, "category": "c", "turns": ["Hi."]}\n')
    assert [p.text for p in load_prompts(prompts_path(str(path)))] == ["Hi."]
    with pytest.raises(BenchInputError, match="does not exist"):
        load_prompts(prompts_path("humaneval-typo"))

"""Benchmark harness: the JSON it writes, prompt loading, divergence and near-tie bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.bench.harness import first_divergence, summarize
from runtime.bench.prompts import Prompt
from runtime.bench.report import format_table
from runtime.cli import main
from workers.cpu_info import cpu_info

MODE_KEYS = {
    "tokens",
    "seconds",
    "tokens_per_s",
    "speedup_vs_ar",
    "speedup_vs_hf",
    "mean_accepted",
    "identical_to_ar",
    "divergent",
    "near_tie_divergences",
    "acceptance_by_depth",
    "per_category",
    "per_prompt",
}
ROW_KEYS = {"question_id", "category", "tokens", "forward_passes", "identical_to_ar", "first_divergence", "near_tie"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- end to end, real model


@pytest.mark.real_model
def test_bench_real_model(tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"question_id": 11, "category": "qa", "turns": ["What is the capital of France?", "And Italy?"]},
            {"question_id": 22, "category": "math", "turns": ["What is 12 plus 30?"]},
        ],
    )
    out = tmp_path / "out" / "bench.json"
    argv = ["bench", "--prompts", str(prompts), "--modes", "ar,hf,hf-pld,ht", "--max-new-tokens", "6"]
    rc = main(argv + ["--out", str(out), "--no-progress", "--threads", "1"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert f"wrote {out}" in stdout
    assert "mode" in stdout and "hf-pld" in stdout  # the table

    result = json.loads(out.read_text())
    assert result["model"] == "default"
    assert result["dtype"] == "float32"
    assert result["threads"] == 1
    assert result["max_new_tokens"] == 6
    assert result["prompts"] == 2
    assert result["near_tie_tol"] == 1e-3
    assert list(result["modes"]) == ["ar", "hf", "hf-pld", "ht"]

    for name, mode in result["modes"].items():
        assert set(mode) >= MODE_KEYS, name
        rows = mode["per_prompt"]
        assert [r["question_id"] for r in rows] == [11, 22]
        assert [r["category"] for r in rows] == ["qa", "math"]
        for row in rows:
            assert set(row) >= ROW_KEYS
            assert 1 <= row["tokens"] <= 6
            assert row["forward_passes"] >= 1
            assert row["identical_to_ar"] == (row["first_divergence"] is None)
        assert mode["tokens"] == sum(r["tokens"] for r in rows)
        assert mode["identical_to_ar"] + mode["divergent"] == 2
        assert 0 <= mode["near_tie_divergences"] <= mode["divergent"]
        assert mode["tokens_per_s"] > 0 and mode["seconds"] > 0
        assert mode["mean_accepted"] >= 1.0
        assert mode["speedup_vs_hf"] is not None
        assert set(mode["per_category"]) == {"qa", "math"}
        assert all(c["prompts"] == 1 for c in mode["per_category"].values())

    ar, hf = result["modes"]["ar"], result["modes"]["hf"]
    assert ar["mean_accepted"] == 1.0
    assert ar["speedup_vs_ar"] == 1.0
    assert ar["identical_to_ar"] == 2 and ar["divergent"] == 0
    assert hf["speedup_vs_hf"] == 1.0
    # float32: transformers' greedy decoding gives ar's tokens exactly, one per forward pass.
    assert hf["identical_to_ar"] == 2
    assert hf["mean_accepted"] == 1.0
    assert [r["tokens"] for r in hf["per_prompt"]] == [r["tokens"] for r in ar["per_prompt"]]
    assert ar["acceptance_by_depth"] == [] and hf["acceptance_by_depth"] == []
    assert result["modes"]["ht"]["identical_to_ar"] == 2  # float32: lossless


# --------------------------------------------------------------------------- first_divergence


@pytest.mark.parametrize(
    "ref, out, expected",
    [
        ([], [], None),
        ([1, 2, 3], [1, 2, 3], None),
        ([1, 2, 3], [9, 2, 3], 0),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2, 3, 4], [1, 5, 3, 6], 1),
        ([1, 2, 3], [1, 2], 2),  # out stopped early
        ([1, 2], [1, 2, 3], 2),  # out went on
        ([], [1], 0),
        ([1, 2], [1, 3, 4], 1),  # a differing token comes before the length difference
    ],
)
def test_first_divergence(ref, out, expected):
    assert first_divergence(ref, out) == expected


# --------------------------------------------------------------------------- summarize

TOL = 1e-3


def fake_engine():
    return SimpleNamespace(
        config=SimpleNamespace(checkpoint="tiny", dtype="float32", weights="float"),
        folder=Path("/models/tiny"),
        model=SimpleNamespace(device="cpu"),
    )


def make_run(tokens, margins=None, forward_passes=None, seconds=1.0) -> dict:
    return {
        "tokens": list(tokens),
        "margins": list(margins) if margins is not None else [],
        "forward_passes": forward_passes if forward_passes is not None else len(tokens),
        "step_tokens": [],
        "seconds": seconds,
    }


def summary():
    prompts = [Prompt(1, "x", "p1"), Prompt(2, "x", "p2"), Prompt(3, "y", "p3")]
    ar_margins = [2.0, 3.0, 0.0005, 1.0]
    runs = {
        "ar": [
            make_run([5, 6, 7, 8], ar_margins, seconds=2.0),
            make_run([5, 6, 7, 8], ar_margins, seconds=2.0),
            make_run([1, 2, 3, 4], [4.0, 5.0, 6.0, 7.0], seconds=2.0),
        ],
        "fast": [
            make_run([5, 6, 7, 8], forward_passes=2, seconds=0.5),  # identical
            make_run([5, 6, 9, 9], forward_passes=2, seconds=0.5),  # diverges at 2, ar margin 0.0005: near tie
            make_run([1, 0, 3, 4], forward_passes=4, seconds=1.0),  # diverges at 1, ar margin 5.0: a real error
        ],
    }
    return summarize(fake_engine(), prompts, ["ar", "fast"], runs, 4, TOL, 3)


def test_summarize_header():
    result = summary()
    assert result["model"] == "tiny"
    assert result["checkpoint_folder"] == str(Path("/models/tiny"))
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert result["threads"] == 3 and result["max_new_tokens"] == 4 and result["prompts"] == 3
    assert result["near_tie_tol"] == TOL
    assert result["cpu"] == cpu_info() and result["cpu"]["class"] in ("AMX", "AVX512-BF16", "AVX2", "other")
    assert f"cpu {result['cpu']['model']} ({result['cpu']['class']}" in format_table(result)


def test_summarize_near_ties():
    fast = summary()["modes"]["fast"]
    rows = fast["per_prompt"]
    assert [r["identical_to_ar"] for r in rows] == [True, False, False]
    assert [r["first_divergence"] for r in rows] == [None, 2, 1]
    assert [r["ar_margin_at_divergence"] for r in rows] == [None, 0.0005, 5.0]
    assert [r["near_tie"] for r in rows] == [False, True, False]
    assert fast["identical_to_ar"] == 1
    assert fast["divergent"] == 2
    assert fast["near_tie_divergences"] == 1


def test_summarize_near_tie_uses_the_tolerance():
    prompts = [Prompt(1, "x", "p")]
    runs = {"ar": [make_run([1, 2], [1.0, 0.2])], "m": [make_run([1, 3])]}
    loose = summarize(fake_engine(), prompts, ["ar", "m"], runs, 2, 0.25, 1)["modes"]["m"]
    tight = summarize(fake_engine(), prompts, ["ar", "m"], runs, 2, 0.1, 1)["modes"]["m"]
    assert loose["near_tie_divergences"] == 1
    assert tight["near_tie_divergences"] == 0
    assert loose["divergent"] == tight["divergent"] == 1


def test_summarize_length_divergence_without_margin():
    """ar stopped (eos) where the mode went on: a divergence with no ar margin, never a near tie."""
    prompts = [Prompt(1, "x", "p")]
    runs = {"ar": [make_run([1, 2], [0.0001, 0.0001])], "m": [make_run([1, 2, 3])]}
    row = summarize(fake_engine(), prompts, ["ar", "m"], runs, 3, TOL, 1)["modes"]["m"]["per_prompt"][0]
    assert row["first_divergence"] == 2
    assert row["ar_margin_at_divergence"] is None
    assert row["near_tie"] is False


def test_summarize_rates():
    result = summary()
    ar, fast = result["modes"]["ar"], result["modes"]["fast"]
    assert ar["tokens"] == fast["tokens"] == 12
    assert ar["seconds"] == 6.0 and fast["seconds"] == 2.0
    assert ar["tokens_per_s"] == 2.0 and fast["tokens_per_s"] == 6.0
    assert ar["speedup_vs_ar"] == 1.0 and fast["speedup_vs_ar"] == 3.0
    assert ar["speedup_vs_hf"] is None and fast["speedup_vs_hf"] is None  # no hf mode in this run
    assert ar["mean_accepted"] == 1.0
    assert fast["mean_accepted"] == 1.5  # 12 tokens in 8 forward passes
    assert ar["identical_to_ar"] == 3 and ar["divergent"] == 0
    assert fast["per_category"] == {
        "x": {"prompts": 2, "tokens_per_s": 8.0, "speedup_vs_ar": 4.0, "mean_accepted": 2.0},  # ar: 8 tokens in 4 s
        "y": {"prompts": 1, "tokens_per_s": 4.0, "speedup_vs_ar": 2.0, "mean_accepted": 1.0},
    }
    assert [r["forward_passes"] for r in fast["per_prompt"]] == [2, 2, 4]
    table = format_table(result)
    assert "fast" in table and "3.00x" in table


def test_summarize_speedup_vs_hf():
    prompts = [Prompt(1, "x", "p")]
    runs = {
        "ar": [make_run([1, 2, 3, 4], [1.0] * 4, seconds=2.0)],
        "hf": [make_run([1, 2, 3, 4], seconds=1.0)],
        "m": [make_run([1, 2, 3, 4], seconds=0.5)],
    }
    modes = summarize(fake_engine(), prompts, ["ar", "hf", "m"], runs, 4, TOL, 1)["modes"]
    assert modes["ar"]["speedup_vs_hf"] == 0.5
    assert modes["hf"]["speedup_vs_hf"] == 1.0
    assert modes["m"]["speedup_vs_hf"] == 2.0
    assert modes["m"]["speedup_vs_ar"] == 4.0


def test_acceptance_by_depth():
    from runtime.bench.harness import acceptance_by_depth

    runs = [{"step_tokens": [1, 3, 2]}, {"step_tokens": [4]}]  # accepted 0, 2, 1 and 3 drafts
    assert acceptance_by_depth(runs) == [0.75, 0.5, 0.25]
    assert acceptance_by_depth([{"step_tokens": [1, 1]}]) == []
    assert acceptance_by_depth([{"step_tokens": []}]) == []


@pytest.mark.real_model
def test_bench_sampled_real_model(tmp_path, capsys):
    """Sampling: lossless modes reproduce ar's seeded draws; hf samples with its own RNG."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "category": "qa", "turns": ["Name a colour."]},
                                                 {"question_id": 2, "category": "qa", "turns": ["Name a fruit."]}])
    out = tmp_path / "bench.json"
    rc = main(["bench", "--prompts", str(prompts), "--modes", "ar,hf,pld,ht", "--max-new-tokens", "12",
               "--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--out", str(out), "--no-progress",
               "--threads", "1"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "temperature 0.8 top-k 0 top-p 0.9 seed 5+i" in stdout and "(not compared)" in stdout
    result = json.loads(out.read_text())
    assert result["sampling"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.9, "seed": 5}
    for mode in ("pld", "ht"):
        assert result["modes"][mode]["identical_to_ar"] == 2
    hf = result["modes"]["hf"]
    assert hf["identical_to_ar"] is None and hf["divergent"] is None
    assert all(r["identical_to_ar"] is None for r in hf["per_prompt"])

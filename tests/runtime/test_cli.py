"""The `leapfrog` command in-process: usage errors exit 2 with a message, generate streams a reply."""

from __future__ import annotations

import json
import re

import pytest
import torch

from runtime.cli import EXIT_USAGE, main
from runtime.decoding.autoregressive import generate_ar
from runtime.modes import MODES

# Every command runs on one thread: the machine is shared.
T1 = ["--threads", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def write_prompts(path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD_ROW = {"question_id": 1, "category": "qa", "turns": ["Hi?"]}


# --------------------------------------------------------------------------- argparse errors


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "hi", "--max-new-tokens", "0"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "-3"],
        ["generate", "--prompt", "hi", "--max-new-tokens", "many"],
        ["generate", "--prompt", "hi", "--threads", "0"],
        ["bench", "--threads", "0"],
        ["bench", "--limit", "0"],
        ["generate", "--prompt", "hi", "--dtype", "float64"],
        ["generate"],  # --prompt is required
        [],  # a command is required
        ["serve", "--port", "70000"],
        ["serve", "--http-port", "-2"],
        ["serve", "--concurrency", "0"],
    ],
)
def test_argparse_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage: leapfrog" in capsys.readouterr().err


def test_positive_int_message(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "--max-new-tokens", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- usage errors -> 2


def test_unknown_mode_generate(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--mode", "telepathy", *T1)
    assert rc == EXIT_USAGE
    assert "'telepathy'" in err
    for name in MODES:
        assert name in err
    assert "available" in err and "ar" in MODES and "hf-pld" in MODES
    assert out == ""


def test_unknown_mode_bench(capsys, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [GOOD_ROW])
    rc, _, err = run(capsys, "bench", "--prompts", prompts, "--modes", "ar,warp", *T1)
    assert rc == EXIT_USAGE
    assert "'warp'" in err and "available" in err and "hf-pld" in err


def test_empty_modes(capsys, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [GOOD_ROW])
    rc, _, err = run(capsys, "bench", "--prompts", prompts, "--modes", " , ", *T1)
    assert rc == EXIT_USAGE
    assert "--modes is empty" in err


def test_nonexistent_checkpoint(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--checkpoint", str(missing), *T1)
    assert rc == EXIT_USAGE
    assert str(missing) in err and "does not exist" in err
    assert err.startswith("leapfrog generate: error:")
    assert "Traceback" not in err


def test_checkpoint_folder_without_weights(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    rc, _, err = run(capsys, "generate", "--prompt", "hi", "--checkpoint", str(tmp_path), *T1)
    assert rc == EXIT_USAGE
    assert "safetensors" in err


def test_checkpoint_without_tokenizer(capsys, tiny_checkpoint):
    """A tiny HF folder has a model but no tokenizer: a clean error, not a traceback."""
    folder = tiny_checkpoint("llama")
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--checkpoint", str(folder), *T1)
    assert rc == EXIT_USAGE
    assert "tokenizer" in err and str(folder) in err
    assert out == ""


def test_unsupported_checkpoint_in_config(capsys, tmp_path):
    """The checkpoint can come from the config file too."""
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\ncheckpoint = "{tmp_path / "weights.bin"}"\n')
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    rc, _, err = run(capsys, "generate", "--prompt", "hi", "--config", str(config), *T1)
    assert rc == EXIT_USAGE
    assert "not a .gguf" in err


def test_missing_prompts_file(capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    rc, _, err = run(capsys, "bench", "--prompts", str(missing), "--modes", "ar", *T1)
    assert rc == EXIT_USAGE
    assert str(missing) in err and "does not exist" in err


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        json.dumps({"question_id": 2, "turns": ["no category"]}),
        json.dumps({"question_id": 2, "category": "qa", "turns": []}),
        json.dumps({"question_id": 2, "category": "qa", "turns": [""]}),
        json.dumps({"question_id": 2, "category": "qa", "turns": [7]}),
        json.dumps(["a", "list"]),
    ],
)
def test_malformed_prompts_file(capsys, tmp_path, bad):
    path = tmp_path / "p.jsonl"
    write_prompts(path, [GOOD_ROW, "", bad, GOOD_ROW])  # the bad row is on line 3
    rc, _, err = run(capsys, "bench", "--prompts", str(path), "--modes", "ar", *T1)
    assert rc == EXIT_USAGE
    assert f"{path}:3:" in err


def test_empty_prompts_file(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n\n")
    rc, _, err = run(capsys, "bench", "--prompts", str(path), "--modes", "ar", *T1)
    assert rc == EXIT_USAGE
    assert "holds no prompts" in err


@pytest.mark.parametrize(
    "text, match",
    [
        ("[model]\nflavour = 'vanilla'\n", "unknown keys"),
        ("[sampler]\ntop_p = 0.9\n", "unknown sections"),
        ("[generation]\nmax_new_tokens = 'ten'\n", "max_new_tokens must be int"),
        ("[runtime]\nthreads = 1.5\n", "threads must be int"),
        ("[model]\ndtype = 'int4'\n", "dtype must be one of"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_config_file(capsys, tmp_path, text, match):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for argv in (["generate", "--prompt", "hi"], ["bench", "--modes", "ar"]):
        rc, out, err = run(capsys, *argv, "--config", str(config), *T1)
        assert rc == EXIT_USAGE
        assert re.search(match, err), err
        assert out == ""


def test_missing_config_file(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", "--prompt", "hi", "--config", str(tmp_path / "none.toml"), *T1)
    assert rc == EXIT_USAGE
    assert "does not exist" in err


def test_flags_override_config(capsys, tmp_path):
    """A valid config with a bad mode: the --mode flag wins over it (and over the file's checkpoint)."""
    config = tmp_path / "c.toml"
    config.write_text('[generation]\nmode = "nonsense"\n')
    rc, _, err = run(capsys, "generate", "--prompt", "hi", "--config", str(config), "--mode", "other", *T1)
    assert rc == EXIT_USAGE
    assert "'other'" in err and "nonsense" not in err


def test_no_cuda_graphs_flag_overrides_the_config(tmp_path):
    from runtime.cli import build_parser, resolve_config

    config = tmp_path / "c.toml"
    config.write_text("[model]\ncuda_graphs = true\n")
    parser = build_parser()
    assert resolve_config(parser.parse_args(["generate", "--prompt", "hi", "--config", str(config)])).model.cuda_graphs
    args = parser.parse_args(["generate", "--prompt", "hi", "--config", str(config), "--no-cuda-graphs"])
    assert resolve_config(args).model.cuda_graphs is False


# --------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_generate_smoke(capsys, real_model):
    prompt = "What is the capital of France?"
    rc, out, err = run(capsys, "generate", "--prompt", prompt, "--max-new-tokens", "8", *T1)
    assert rc == 0, err
    assert out.strip(), "no reply on stdout"
    # stderr's stats line: "[ht] N tokens in S s: R tokens/s, ..." (ht, the default mode)
    stats = re.search(r"\[ht\] (\d+) tokens in [\d.]+s: [\d.]+ tokens/s", err)
    assert stats, err
    n = int(stats.group(1))
    assert 1 <= n <= 8
    assert "float32" in err and "1 thread," in err

    # The streamed text is exactly the greedy reply of the same model, decoded plainly.
    model, tokenizer, _ = real_model
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    stop = {tokenizer.eos_token_id}
    with torch.inference_mode():
        tokens = [t for s in generate_ar(model, model.new_cache(128), list(ids), 8, stop) for t in s.tokens]
    assert len(tokens) == n
    assert out == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


@pytest.mark.real_model
def test_prompt_too_long(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "5000", *T1)
    assert rc == EXIT_USAGE
    assert "exceeds the context" in err and "5000" in err
    assert out == ""


@pytest.mark.real_model
def test_generate_ht_compare_ar(capsys):
    """The demo's command: ht with the shipped weights, then ar on the same prompt."""
    rc, out, err = run(capsys, "generate", "--prompt", "Name three fruits.", "--mode", "ht", "--compare", "ar,ht",
                       "--max-new-tokens", "16", *T1)
    assert rc == 0, err
    assert out.strip()
    assert re.search(r"\[ht\] \d+ tokens in [\d.]+s: [\d.]+ tokens/s, [\d.]+ tokens per forward pass", err), err
    assert re.search(r"\[ar\] \d+ tokens .*; output vs \[ht\]: identical", err), err
    assert err.count("[ht]") == 2  # ht itself is not run again by --compare


@pytest.mark.real_model
def test_generate_compares_one_worker_on_other_thread_counts(capsys):
    """MODE@N runs a compared mode on N torch threads (the demo: one worker on one core and
    on both), its own label and thread count printed, its output checked like the others."""
    rc, out, err = run(capsys, "generate", "--prompt", "Name three fruits.", "--mode", "ht", "--compare", "ht@2,ar@1,ar",
                       "--max-new-tokens", "12", *T1)
    assert rc == 0, err
    assert re.search(r"\[ht@2\] \d+ tokens .* \(2 threads\); output vs \[ht\]: identical", err), err
    assert re.search(r"\[ar\] \d+ tokens .* \(1 thread\); output vs \[ht\]: identical", err), err
    assert "[ar@1]" not in err  # @ the configured threads is the plain run, run once
    assert torch.get_num_threads() == 1  # set back after the 2-thread run


@pytest.mark.real_model
def test_generate_async_prints_what_its_workers_did(capsys):
    """A pipelined mode's line about its workers: verifying steps and the drafter's time."""
    rc, out, err = run(capsys, "generate", "--prompt", "Name three fruits.", "--mode", "async", "--transport", "local",
                       "--compare", "ar", "--max-new-tokens", "16", *T1)
    assert rc == 0, err
    assert re.search(r"\[async\] \d+ verifying steps \(\d+ ms of compute each\); the drafter drafted [\d.]+ s beside", err), err
    assert re.search(r"\[ar\] \d+ tokens .*; output vs \[async\]: identical", err), err


@pytest.mark.parametrize("item", ["ht@0", "ht@x", "pipeline@2"])
def test_generate_compare_bad_threads(capsys, item):
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--compare", item, *T1)
    assert rc == EXIT_USAGE and item in err and out == ""


def test_generate_compare_unknown_mode(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--compare", "ar,nope", *T1)
    assert rc == EXIT_USAGE and "nope" in err and out == ""


def test_describe_difference_reports_position_and_margin():
    from runtime.bench.report import describe_difference

    assert describe_difference([1, 2, 3], [0.5, 0.5, 0.5], [1, 2, 3], "float32") == "identical"
    tie = describe_difference([1, 2, 3], [0.5, 0.1, 0.5], [1, 9, 3], "bfloat16")
    assert "token 1" in tie and "0.1000" in tie and "bfloat16 near tie" in tie
    real = describe_difference([1, 2, 3], [0.5, 0.1, 0.5], [1, 9, 3], "float32")
    assert "NOT a near tie" in real
    assert "token 2" in describe_difference([1, 2], [0.5, 0.5], [1, 2, 3], "float32")


@pytest.mark.real_model
def test_generate_sampled_compare(capsys):
    """Same seed, same reply in every lossless mode; a reply other than the greedy one."""
    args = ("--prompt", "Write a haiku about rain.", "--max-new-tokens", "20", *T1)
    rc, greedy_out, err = run(capsys, "generate", *args)
    assert rc == 0, err
    rc, out, err = run(capsys, "generate", *args, "--mode", "ht", "--compare", "ar,token-recycling",
                       "--temperature", "0.9", "--top-k", "40", "--seed", "7")
    assert rc == 0, err
    assert "temperature 0.9, top-k 40, top-p 1.0, seed 7" in err
    assert re.search(r"\[ar\] .*; output vs \[ht\]: identical", err), err
    assert re.search(r"\[token-recycling\] .*; output vs \[ht\]: identical", err), err
    assert out != greedy_out


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-2")])
def test_bad_sampling_flags(capsys, flag, value):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", flag, value])
    assert "expected" in capsys.readouterr().err

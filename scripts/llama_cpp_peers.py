"""llama.cpp's own tools as peers, on the same prompts as `leapfrog bench`: speculative
decoding with a draft model (issue 37) or an n-gram lookup, as llama.cpp's
`llama-speculative-simple` runs it, against plain decoding, `llama-bench`'s tg speed.

llama-cpp-python (the `llama.cpp` bench modes) has no draft-model speculation, so this
runs llama.cpp's binaries. `make llama-cpp-tools` builds them (about 10 minutes) from
the llama.cpp sources that the pinned llama-cpp-python sdist vendors (PyPI only), into
.venv/llama.cpp/build/bin, where --bin looks by default:

    make llama-cpp-tools
    python scripts/llama_cpp_peers.py --checkpoint qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b \
        --threads 2 --per-category 1 --max-new-tokens 64 --out peers.json

Each prompt is our chat template's text (llama.cpp tokenizes it with its special tokens);
greedy; `--no-repack`, as the AMX-repacked weights crash this build's speculative tool in
ggml_backend_amx_mul_mat (llama-bench's tg barely moves with it: 12.48 against 12.11
tok/s for the 1.5B on the AMX Xeon). `decoded N tokens in S seconds` is llama.cpp's own count, the prompt excluded:
compare it with llama-bench's tg of the target (plain decoding, same run; `--spec-type
none` crashes this build), and with our modes as ratios to their own plain decoding.
The CPU is recorded.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bench.prompts import load_prompts, prompts_path  # noqa: E402
from runtime.text.chat import encode_chat  # noqa: E402
from workers.cpu_info import cpu_info  # noqa: E402
from workers.loading import gguf_file, load_tokenizer, resolve_checkpoint  # noqa: E402

TOOLS = Path(__file__).resolve().parents[1] / ".venv" / "llama.cpp" / "build" / "bin"  # make llama-cpp-tools
DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
COUNTS = {name: re.compile(rf"{name}\s+=\s+(\d+)") for name in ("n_drafted", "n_accept")}


def settings(draft: Path | None, n_max: list[int]) -> dict[str, list[str]]:
    """Name -> llama-speculative-simple arguments of each setting run."""
    # No plain setting: `--spec-type none` crashes this build; plain decoding is llama-bench's tg.
    out = {"ngram-simple": ["--spec-type", "ngram-simple"]}
    if draft is not None:
        for n in n_max:
            out[f"draft-{n}"] = ["--spec-type", "draft-simple", "-md", str(draft), "--spec-draft-n-max", str(n)]
    return out


def run_one(binary: Path, target: Path, prompt: Path, args: list[str], threads: int, tokens: int) -> dict:
    """One setting on one prompt (a text file): decoded tokens, their seconds, drafts made and accepted."""
    cmd = [str(binary), "-m", str(target), "-f", str(prompt), "-n", str(tokens), "-t", str(threads), "-td", str(threads),
           "-c", "4096", "--temp", "0", "--seed", "1", "--no-repack", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    log = done.stdout + done.stderr
    m = DECODED.search(log)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{log[-2000:]}")
    out = {"tokens": int(m.group(1)), "seconds": float(m.group(2))}
    for name, pattern in COUNTS.items():
        found = pattern.search(log)
        out[name] = int(found.group(1)) if found else None
    return out


def tg_speed(bin_dir: Path, model: Path, threads: int, tokens: int) -> float:
    """llama-bench's tg speed (tokens/s, 3 repetitions, no prompt)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "3", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    return float(json.loads(done.stdout)[0]["avg_ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=str(TOOLS), help=f"llama.cpp's build/bin folder (default {TOOLS}: make llama-cpp-tools)")
    p.add_argument("--checkpoint", default="default", help="the target: default, a named checkpoint or a .gguf file")
    p.add_argument("--draft", default=None, help="a draft model of the same vocabulary (a named checkpoint or .gguf)")
    p.add_argument("--n-max", default="3,16", help="draft tokens per step, each a setting (default 3: the tool's own, and 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", default=None)
    p.add_argument("--per-category", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    bin_dir = Path(a.bin)
    if not (bin_dir / "llama-speculative-simple").is_file():
        sys.exit(f"no llama.cpp tools in {bin_dir}: run `make llama-cpp-tools` (about 10 minutes) or pass --bin")
    target = gguf_file(a.checkpoint)
    draft = gguf_file(a.draft) if a.draft else None
    if target is None or (a.draft and draft is None):
        sys.exit("llama.cpp needs GGUF files: default, a named checkpoint (`make models`) or a .gguf path")
    tokenizer = load_tokenizer(resolve_checkpoint(a.checkpoint))
    prompts = load_prompts(prompts_path(a.prompts), a.limit, a.per_category)
    runs = settings(draft, [int(n) for n in a.n_max.split(",")])
    result = {"cpu": cpu_info(), "target": str(target), "draft": str(draft) if draft else None, "threads": a.threads,
              "max_new_tokens": a.max_new_tokens, "prompts": len(prompts),
              "llama_bench_tg": {"target": tg_speed(bin_dir, target, a.threads, a.max_new_tokens)}, "settings": {}}
    if draft is not None:
        result["llama_bench_tg"]["draft"] = tg_speed(bin_dir, draft, a.threads, a.max_new_tokens)
    per = {name: [] for name in runs}
    folder = tempfile.TemporaryDirectory()
    for i, prompt in enumerate(prompts):
        text = Path(folder.name) / f"prompt-{i}.txt"
        text.write_text(tokenizer.decode(encode_chat(tokenizer, prompt.text)))
        for name, args in runs.items():  # the settings take turns on each prompt
            per[name].append(run_one(bin_dir / "llama-speculative-simple", target, text, args, a.threads, a.max_new_tokens))
        print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(
            f"{n} {r[-1]['tokens'] / r[-1]['seconds']:.2f}" for n, r in per.items()), flush=True)
    base = result["llama_bench_tg"]["target"]
    for name, rows in per.items():
        speed = sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)
        drafted = sum(r["n_drafted"] or 0 for r in rows)
        result["settings"][name] = {"tok_s": speed, "vs_tg": speed / base, "tokens": sum(r["tokens"] for r in rows),
                                    "accept": sum(r["n_accept"] or 0 for r in rows) / drafted if drafted else None,
                                    "runs": rows}
        print(f"{name:14s} {speed:7.2f} tok/s  {speed / base:5.2f}x llama-bench tg {base:.2f}", flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

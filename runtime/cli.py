"""The `leapfrog` command: generate (stream a reply) and bench (modes side by side)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from runtime.config import DTYPES, ConfigError, LeapfrogConfig, load_config

EXIT_USAGE = 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (default: configs/default.toml)")
    p.add_argument("--checkpoint", help="'default', a .gguf file or a Hugging Face checkpoint folder")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument("--ht-weights", help="hidden-transfer weights (.safetensors) for mode ht")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapfrog", description="Lossless parallel decoding for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream the reply to a chat prompt")
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--mode", help="decoding mode (default: ar)")
    add_common(gen)

    bench = sub.add_parser("bench", help="run decoding modes side by side on a prompt file")
    bench.add_argument("--prompts", help="Spec-Bench-format JSONL (default: the bundled Spec-Bench)")
    bench.add_argument("--modes", default="ar,hf,hf-pld", help="comma-separated modes (ar always runs)")
    bench.add_argument("--limit", type=positive_int, help="use the first N prompts")
    bench.add_argument("--per-category", type=positive_int, help="use the first N prompts of each category")
    bench.add_argument("--near-tie-tol", type=float, help="top-2 logit margin of a near tie (default by dtype)")
    bench.add_argument("--out", help="write the JSON result here")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_common(bench)
    return parser


def resolve_config(args) -> LeapfrogConfig:
    config = load_config(args.config)
    for attr, section, key in (
        ("checkpoint", config.model, "checkpoint"),
        ("dtype", config.model, "dtype"),
        ("device", config.model, "device"),
        ("threads", config.runtime, "threads"),
        ("max_new_tokens", config.generation, "max_new_tokens"),
        ("mode", config.generation, "mode"),
        ("ht_weights", config.ht, "weights"),
    ):
        if getattr(args, attr, None) is not None:
            setattr(section, key, getattr(args, attr))
    return config.validate()


def check_modes(names: list[str]) -> None:
    from runtime.modes import MODES, UnknownModeError

    for name in names:
        if name not in MODES:
            raise UnknownModeError(f"unknown mode {name!r}; available: {', '.join(MODES)}")


def make_engine(config: LeapfrogConfig):
    import torch

    from runtime.engine import Engine

    torch.set_num_threads(config.runtime.threads)
    return Engine(config.model, config.ht)


def cmd_generate(args, config: LeapfrogConfig) -> int:
    mode, max_new = config.generation.mode, config.generation.max_new_tokens
    check_modes([mode])
    engine = make_engine(config)
    prompt_ids = engine.encode_chat(args.prompt)
    engine.check_fits(prompt_ids, max_new)
    tokens = passes = 0
    start = time.perf_counter()
    from runtime.text import TextStream

    text = TextStream(engine.tokenizer)
    for step in engine.steps(prompt_ids, mode, max_new):
        tokens += len(step.tokens)
        passes += step.forward_passes
        print(text.push(step.tokens), end="", flush=True)
    print(text.flush())
    seconds = time.perf_counter() - start
    print(
        f"[{mode}] {tokens} tokens in {seconds:.2f}s: {tokens / seconds:.1f} tokens/s, "
        f"{tokens / passes:.2f} tokens per forward pass ({config.model.dtype}, {config.runtime.threads} threads)",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args, config: LeapfrogConfig) -> int:
    from runtime.bench import NEAR_TIE_TOL, default_prompts_path, format_table, load_prompts, run_bench

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ConfigError("--modes is empty")
    check_modes(modes)
    prompts = load_prompts(args.prompts or default_prompts_path(), args.limit, args.per_category)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tol = args.near_tie_tol if args.near_tie_tol is not None else NEAR_TIE_TOL[config.model.dtype]
    engine = make_engine(config)
    result = run_bench(
        engine, prompts, modes, config.generation.max_new_tokens, tol, config.runtime.threads, not args.no_progress
    )
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from runtime.bench import BenchInputError
    from runtime.engine import PromptTooLongError
    from runtime.modes import UnknownModeError
    from workers.drafters.hidden_transfer import DrafterWeightsError
    from workers.loading import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args)
        return {"generate": cmd_generate, "bench": cmd_bench}[args.command](args, config)
    except (ConfigError, ModelLoadError, UnknownModeError, PromptTooLongError, BenchInputError, DrafterWeightsError) as e:
        print(f"leapfrog {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `leapfrog` command: generate (stream a reply), bench (modes side by side), sweep
(the pipelined modes over a grid), profile (this device's cost curve), train (drafter
weights) and serve (the streaming server). Each command reads its config (configs.files), builds an Engine with
Engine.from_config and hands it to the host-side package that does the work."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import uvloop

from configs.files import load_config
from configs.schema import DTYPES, KERNELS, WEIGHTS, ConfigError, LeapfrogConfig
from configs.training import TrainError
from runtime.arg_types import int_list, non_negative_int, number_type, positive_int
from runtime.bench.charts import speedup_chart
from runtime.bench.harness import NEAR_TIE_TOL, WARMUP_TOKENS, compared_with_ar, run_bench, run_once
from runtime.bench.prompts import BenchInputError, load_prompts, prompts_path
from runtime.bench.report import describe_difference, describe_sampling, describe_threads, format_table, speed_line
from runtime.bench.sweep import load_sweep, project_sweep, run_sweep
from runtime.engine import Engine, PromptTooLongError
from runtime.modes import MODES, PIPELINED_MODES, UnknownModeError, check_mode
from runtime.pipeline.cluster import ensure_ray
from runtime.serving.servers import engine_pool, run_servers, secure
from runtime.text.stream import TextStream
from runtime.training.command import add_train, cmd_train
from runtime.training.sharegpt import ShareGPTError
from workers.cost_curve import CONTEXTS, ROWS, cost_curve
from workers.cpu_info import describe_cpu
from workers.drafters.loading import DrafterWeightsError
from workers.loading import ModelLoadError

EXIT_USAGE = 2


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (default: configs/default.toml)")
    p.add_argument("--checkpoint", help="'default', a named one (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b: `make models`), a .gguf file or a Hugging Face checkpoint folder")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--weights", choices=WEIGHTS,
                   help="linear weights: float (de-quantized, in --dtype) | shipped (the GGUF file's own blocks, CPU kernels) "
                   "| shipped-int8 (those blocks, x quantized to int8 as llama.cpp does)")
    p.add_argument("--kernels", choices=KERNELS, help="matrix-product kernels: auto (native where it runs) | native (its fastest path here) | amx | avx512 | avx2 (a path of native by name) | torch")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                   help="on CUDA, launch every kernel instead of replaying each layer's captured graph")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")


def add_common(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument("--ht-weights", help="hidden-transfer weights (.safetensors) for modes ht, ht-pld, pipeline, async")
    p.add_argument("--workers", type=positive_int, help="model replicas of modes pipeline and async (default 2)")
    p.add_argument("--transport", choices=["ray", "local"], help="how pipeline/async reach their workers (default ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapfrog", description="Lossless parallel decoding for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream the reply to a chat prompt")
    add_sampling(gen)
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--mode", help=f"decoding mode: {', '.join(MODES)} (default: ht, hidden transfer with prompt lookup)")
    gen.add_argument("--compare", help="comma-separated modes to run on the same prompt afterwards, for speed; "
                     "MODE@N runs a single-worker mode on N torch threads (one worker on N cores)")
    add_common(gen)

    bench = sub.add_parser("bench", help="run decoding modes side by side on a prompt file")
    bench.add_argument("--prompts", help="a shipped set (spec-bench, the default; humaneval: code) or a Spec-Bench-format JSONL file")
    bench.add_argument("--modes", default="ar,hf,hf-pld", help=f"comma-separated modes of {', '.join(MODES)} (ar always runs)")
    bench.add_argument("--limit", type=positive_int, help="use the first N prompts")
    bench.add_argument("--per-category", type=positive_int, help="use the first N prompts of each category")
    bench.add_argument("--near-tie-tol", type=float, help="top-2 logit margin of a near tie (default by dtype)")
    bench.add_argument("--out", help="write the JSON result here")
    bench.add_argument("--chart", help="write a PNG bar chart of the speedups here")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_common(bench)
    add_sampling(bench)
    add_train(sub)

    sweep = sub.add_parser("sweep", help="latency/compute sweep of the pipelined modes over a grid (CSV + Pareto plot)")
    sweep.add_argument("--config", help="a config with a [sweep] section (e.g. configs/sweep.toml)")
    sweep.add_argument("--out", required=True, help="folder for sweep.csv, sweep.json and sweep.png")
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sweep.add_argument("--project", metavar="PROFILE",
                       help="also project the runs onto the device of this `leapfrog profile` JSON (projected.csv/.png)")
    sweep.add_argument("--measured", metavar="SWEEP_JSON",
                       help="with --project: project this earlier sweep's sweep.json instead of running --config")
    sweep.add_argument("--project-workers", default="1,2,4,8", help="worker counts to project (default 1,2,4,8)")

    profile = sub.add_parser("profile", help="this device's cost curve t(n): tree-step time against rows (JSON)",
                             description=cost_curve.__doc__.split("\n\n")[0])
    profile.add_argument("--out", required=True, help="write the JSON profile here")
    profile.add_argument("--rows", type=int_list, default=ROWS, help=f"row counts n (default {','.join(map(str, ROWS))})")
    profile.add_argument("--contexts", type=int_list, default=CONTEXTS,
                         help=f"cached positions before the step (default {','.join(map(str, CONTEXTS))})")
    profile.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per shape (the row counts take turns); the median and the minimum are reported")
    profile.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model(profile)

    serve = sub.add_parser(
        "serve",
        help="serve streaming replies: native msgpack protocol over TCP and an OpenAI-compatible HTTP endpoint",
        description="Load the model and serve it (docs/serving.md). Defaults come from the [server] section.",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=number_type(int, lambda v: 0 <= v <= 65535, "a port number"),
                       help="native protocol port (default 7860; 0: any free port)")
    serve.add_argument("--http-port", type=number_type(int, lambda v: -1 <= v <= 65535, "a port number or -1"),
                       help="OpenAI-compatible endpoint port (default 7861; -1: off)")
    serve.add_argument("--mode", help=f"default decoding mode of requests: {', '.join(MODES)} (default: ht, hidden transfer with prompt lookup)")
    serve.add_argument("--concurrency", type=positive_int, help="requests decoding at once, one engine each (default 1)")
    serve.add_argument("--api-key", help="key clients must present (default: $LEAPFROG_API_KEY); needed beyond the loopback")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="listen beyond the loopback without an API key: anyone who reaches the port may use it")
    add_sampling(serve)  # the defaults of requests that leave them out
    add_common(serve)
    return parser


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=number_type(float, lambda v: 0 <= v <= 100, "a number in [0, 100]"),
                   help="0 = greedy (default); above 0 every mode samples with exactly ar's distribution")
    p.add_argument("--top-k", type=non_negative_int, help="sample from the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                   help="sample from the smallest set reaching this probability (1 = off)")
    p.add_argument("--seed", type=non_negative_int, help="sampling seed: the same seed gives the same reply in every mode")


def resolve_config(args) -> LeapfrogConfig:
    config = load_config(args.config)
    for attr, section, key in (
        ("checkpoint", config.model, "checkpoint"),
        ("dtype", config.model, "dtype"),
        ("device", config.model, "device"),
        ("kernels", config.model, "kernels"),
        ("weights", config.model, "weights"),
        ("cuda_graphs", config.model, "cuda_graphs"),
        ("threads", config.runtime, "threads"),
        ("max_new_tokens", config.generation, "max_new_tokens"),
        ("mode", config.generation, "mode"),
        ("ht_weights", config.drafters.ht, "weights"),
        ("temperature", config.sampling, "temperature"),
        ("top_k", config.sampling, "top_k"),
        ("top_p", config.sampling, "top_p"),
        ("host", config.server, "host"),
        ("port", config.server, "port"),
        ("http_port", config.server, "http_port"),
        ("concurrency", config.server, "concurrency"),
        ("api_key", config.server, "api_key"),
        ("insecure", config.server, "insecure"),
        ("workers", config.pipeline, "workers"),
        ("transport", config.pipeline, "transport"),
    ):
        if getattr(args, attr, None) is not None:
            setattr(section, key, getattr(args, attr))
    if args.command in ("generate", "bench", "serve") and args.seed is not None:  # train's --seed is its own
        config.sampling.seed = args.seed
    return config.validate()


def compare_runs(text: str | None, mode: str, config: LeapfrogConfig) -> list[tuple[str, int | None]]:
    """--compare's runs: (mode, torch threads, or None for the configured ones) from items
    MODE or MODE@N; the generated run itself is left out."""
    runs: list[tuple[str, int | None]] = []
    for item in (x.strip() for x in (text or "").split(",")):
        name, _, threads = item.partition("@")
        if not name:
            continue
        check_mode(name)
        n = None
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise ConfigError(f"--compare {item}: the threads after @ must be a whole number >= 1")
            if name in PIPELINED_MODES:
                raise ConfigError(f"--compare {item}: a pipelined mode's workers take [pipeline] threads, not @N")
            n = None if int(threads) == config.runtime.threads else int(threads)
        if (name, n) != (mode, None) and (name, n) not in runs:
            runs.append((name, n))
    return runs


class ThreadsEngines:
    """The engine at its configured threads, and a sibling for each other thread count
    (built and run with torch on that many threads: its modes size their trees for them)."""

    def __init__(self, engine: Engine):
        self.engine, self.siblings = engine, {}

    def run(self, mode: str, threads: int | None, prompt_ids: list[int], max_new: int, sampling) -> dict:
        if threads is None:
            return run_once(self.engine, mode, prompt_ids, max_new, sampling)
        own = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            engine = self.siblings.setdefault(threads, self.engine.sibling())
            return run_once(engine, mode, prompt_ids, max_new, sampling)
        finally:
            torch.set_num_threads(own)


def describe_workers(m: dict) -> str:
    """A pipelined reply's steps, predictions and drafting (runtime.pipeline.metrics)."""
    parts = [f"{m['steps']} verifying steps ({1000 * m['step_s'] / max(m['steps'], 1):.0f} ms of compute each)"]
    if m["spawned"]:
        parts.append(f"{m['spawned']} on predictions, {m['hit_rate']:.0%} held")
    if m["drafts"]:
        parts.append(f"the drafter drafted {m['draft_s']:.1f} s beside {m['step_s']:.1f} s of verifying in {m['wall_s']:.1f} s")
    if m.get("drafter_hit_rate"):
        parts.append(f"its tree was ready below the committed tokens for {m['drafter_hit_rate']:.0%} of steps")
    return "; ".join(parts)


def cmd_generate(args, config: LeapfrogConfig) -> int:
    mode, max_new = config.generation.mode, config.generation.max_new_tokens
    check_mode(mode)
    compare = compare_runs(args.compare, mode, config)
    engine = Engine.from_config(config)
    prompt_ids = engine.encode_chat(args.prompt)
    engine.check_fits(prompt_ids, max_new)
    sampling = config.sampling
    engines = ThreadsEngines(engine)
    if compare:  # build and warm every compared mode, untimed, so no run pays first-call costs
        for m, threads in [(mode, None), *compare]:
            engines.run(m, threads, prompt_ids, min(WARMUP_TOKENS, max_new), sampling)
    tokens: list[int] = []
    margins: list[float] = []
    passes = 0
    text = TextStream(engine.tokenizer)
    start = time.perf_counter()
    for step in engine.steps(prompt_ids, mode, max_new, sampling):
        tokens += step.tokens
        margins += step.margins or []
        passes += step.forward_passes
        print(text.push(step.tokens), end="", flush=True)
    seconds = time.perf_counter() - start
    print(text.flush())
    weights = f", {config.model.weights} weights" if config.model.weights != "float" else ""
    report = f"{config.model.dtype}{weights}, {describe_threads(mode, config)}, {describe_sampling(sampling)}"
    print(f"[{mode}] {speed_line(len(tokens), seconds, passes)} ({report})", file=sys.stderr)
    workers = getattr(engine.mode(mode), "metrics", None)
    if workers:  # a pipelined mode: what its workers did
        print(f"[{mode}] {describe_workers(workers)}", file=sys.stderr)
    for other, threads in compare:  # same prompt, same process, measured right after
        run = engines.run(other, threads, prompt_ids, max_new, sampling)
        line = speed_line(len(run["tokens"]), run["seconds"], run["forward_passes"])
        if compared_with_ar(engine.mode(other), sampling):
            same = describe_difference(tokens, margins, run["tokens"], config.model.dtype)
        else:
            why = "its own sampler" if getattr(engine.mode(other), "exact", True) else "its own arithmetic"
            same = f"not comparable token by token ({why})"
        label, where = (other, describe_threads(other, config)) if threads is None else (
            f"{other}@{threads}", f"{threads} thread{'s' * (threads != 1)}")
        print(f"[{label}] {line} ({where}); output vs [{mode}]: {same}", file=sys.stderr)
    engine.close()
    return 0


def cmd_bench(args, config: LeapfrogConfig) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ConfigError("--modes is empty")
    for name in modes:
        check_mode(name)
    prompts = load_prompts(prompts_path(args.prompts), args.limit, args.per_category)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tol = args.near_tie_tol if args.near_tie_tol is not None else NEAR_TIE_TOL[config.model.dtype]
    engine = Engine.from_config(config)
    result = run_bench(
        engine, prompts, modes, config.generation.max_new_tokens, tol, config.runtime.threads, not args.no_progress,
        config.sampling,
    )
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if args.chart:
        print(f"wrote {speedup_chart([result], [describe_sampling(config.sampling)], args.chart)}")
    return 0


def cmd_profile(args, config: LeapfrogConfig) -> int:
    engine = Engine.from_config(config)
    try:
        profile = cost_curve(engine, args.rows, args.contexts, args.repeats, not args.no_progress)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"t(n) in ms ({profile['dtype']}, {profile['device']}, {profile['threads']} threads; median of {args.repeats})")
    print(f"cpu {describe_cpu()}")
    print(f"{'rows':>6}" + "".join(f"{f'c={c}':>10}" for c in args.contexts))
    for n in args.rows:
        print(f"{n:>6}" + "".join(f"{profile['ms_median'][c][n]:>10.2f}" for c in args.contexts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(profile, indent=1))
    print(f"wrote {args.out}")
    return 0


def cmd_sweep(args) -> int:
    if (args.config is None) == (args.measured is None) or (args.measured and not args.project):
        raise ConfigError("sweep: give --config (run a sweep), or --measured SWEEP_JSON with --project PROFILE")
    try:
        workers = [int(n) for n in args.project_workers.split(",")]
    except ValueError:
        workers = []
    if not workers or min(workers) < 1:
        raise ConfigError(f"--project-workers must be worker counts >= 1, got {args.project_workers!r}")
    measured = args.measured
    if args.config is not None:
        sweep = load_sweep(args.config)
        print(f"sweep: {len(sweep.points())} grid points x modes ar, {', '.join(sweep.references + sweep.modes)}")
        out = run_sweep(sweep, args.out, not args.no_progress)
        print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
        measured = out / "sweep.json"
    if args.project:
        out = project_sweep(measured, args.project, args.out, workers)
        print(f"wrote {out / 'projected.csv'} and {out / 'projected.png'}")
    return 0


def cmd_serve(args, config: LeapfrogConfig) -> int:
    mode = config.generation.mode
    check_mode(mode)
    secure(config)  # before the model loads: a refused exposure fails at once
    if mode in PIPELINED_MODES and config.pipeline.transport == "ray":  # room for every engine's workers
        ensure_ray(config.pipeline.workers * config.server.concurrency)
    engines = engine_pool(config)  # one model, a cache per concurrent request; the default mode built now

    def ready(address, http) -> None:
        host, port = address
        print(f"leapfrog serve: native protocol on {host}:{port}", flush=True)
        if http is not None:
            print(f"leapfrog serve: OpenAI-compatible endpoint on http://{http[0]}:{http[1]}/v1", flush=True)
        print(f"leapfrog serve: mode {mode}, {len(engines)} engine(s); Ctrl-C stops", flush=True)

    try:
        uvloop.run(run_servers(engines, config, ready))
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise ConfigError(f"cannot listen on {config.server.host}: {e}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sweep":  # its config file carries a [sweep] section
            return cmd_sweep(args)
        config = resolve_config(args)
        commands = {"generate": cmd_generate, "bench": cmd_bench, "train": cmd_train,
                    "serve": cmd_serve, "profile": cmd_profile}
        return commands[args.command](args, config)
    except (
        ConfigError, ModelLoadError, UnknownModeError, PromptTooLongError, BenchInputError, DrafterWeightsError,
        TrainError, ShareGPTError,
    ) as e:
        print(f"leapfrog {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""One measurement run on a lent GPU (issue 14), prepared here and run there in one call:

    bash scripts/gpu_check.sh                      # OUT=folder, DEVICE=cuda by default

On `--device` (cuda, or cpu to try the script here) it measures, for each `--dtypes` and
with the decoder layers launched plainly ("graphs off") and replayed from CUDA graphs
("graphs on", workers.graphed_layers; on a CPU the padded layers run eagerly):
  t(n)    one tree step against its rows n at a few context lengths (workers.cost_curve)
  ar      plain decoding tokens/s, `--new-tokens` tokens after a `--context`-token prompt,
          and whether the graphed run's tokens are the plain run's (the first flip's margin)
  modes   with `--checkpoint` (one with a tokenizer; "default" = the packaged GGUF): tokens/s
          of `--modes` and ar on the first Spec-Bench prompt of each category, graphs off and
          on, each mode's tokens against ar's with graphs off (flips with their margins);
          with graphs on also `pipeline`, `--pipeline-workers` workers sharing the device
          over the local transport, with its hit rate and wasted steps
The graphed t(n) of each dtype is also written as a `leapfrog profile` JSON (profile-DTYPE.json
beside --out) for `leapfrog sweep --project` and `[tree_sizing] cost`.
Without `--checkpoint` the model has random weights of SmolLM2-135M's shape, which is all
t(n) and ar need (the real GGUF file, 98 MB, is over one device call's 64 MiB: it travels
in two calls). Writes one JSON file, rewritten after every part.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from runtime.decoding.autoregressive import generate_ar
from workers.cost_curve import step_times
from workers.graphed_layers import GraphedLayers
from workers.loading import load_model
from workers.tree_step import decoding_cache

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def random_checkpoint(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ar_run(model, cache, context: int, new_tokens: int) -> tuple[float, list[int], list[float]]:
    """(tokens/s, tokens, margins) of greedy ar after a random `context`-token prompt."""
    prompt = torch.randint(0, model.args.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    list(generate_ar(model, cache, prompt, 8, set()))  # warm-up (and graph capture)
    sync(model.device)
    t0 = time.perf_counter()
    steps = list(generate_ar(model, cache, prompt, new_tokens, set()))
    sync(model.device)
    tokens = [t for s in steps for t in s.tokens]
    return round(len(tokens) / (time.perf_counter() - t0), 2), tokens, [m for s in steps for m in s.margins]


def first_flip(reference: list[int], margins: list[float], got: list[int]) -> dict | None:
    """Where `got` leaves `reference` first, with the reference's logit margin there."""
    i = next((i for i, (a, b) in enumerate(zip(reference, got)) if a != b), None)
    if i is None and len(reference) == len(got):
        return None
    i = min(len(reference), len(got)) if i is None else i
    return {"index": i, "margin": round(margins[i], 5) if i < len(margins) else None}


def mode_speeds(checkpoint: str, dtype: str, device: str, modes: list[str], new_tokens: int, workers: int,
                graph_settings: tuple[bool, ...] = (False, True)) -> dict:
    """The modes with graphs off, then on (`graph_settings`); with `workers`, `pipeline` (that
    many workers on threads sharing the device, local transport) with graphs on, against the
    same ar (the first setting's)."""
    from configs.schema import ModelConfig, PipelineConfig

    out, reference = {}, {}
    for graphs in graph_settings:
        runs = ["ar", *modes] + (["pipeline"] if graphs and workers else [])
        pipeline = PipelineConfig(transport="local", workers=max(workers, 1))
        out |= time_modes(ModelConfig(checkpoint=checkpoint, dtype=dtype, device=device, cuda_graphs=graphs),
                          pipeline, runs, new_tokens, reference, f"graphs {'on' if graphs else 'off'}")
    return out


def time_modes(config, pipeline, modes: list[str], new_tokens: int, reference: dict, label: str) -> dict:
    """tokens/s of each mode over the first Spec-Bench prompt of every category; tokens
    against `reference` (the first run's per prompt: ar with the first graph setting); the pipeline's
    hit rate and wasted steps."""
    from runtime.bench.prompts import default_prompts_path, load_prompts
    from runtime.engine import Engine

    engine, out = Engine(config, pipeline=pipeline), {}
    reference.setdefault("label", label.replace(" ", "_"))  # the first run's ar is everyone's reference
    prompts = [engine.encode_chat(p.text) for p in load_prompts(default_prompts_path(), None, 1)]
    for mode in modes:
        list(engine.steps(prompts[0], mode, 8))  # warm-up
        tokens, seconds, same, flips, pipe = 0, 0.0, 0, [], {"hits": 0, "spawned": 0, "steps": 0, "wasted_steps": 0}
        for i, ids in enumerate(prompts):
            sync(engine.model.device)
            t0 = time.perf_counter()
            steps = list(engine.steps(ids, mode, new_tokens))
            sync(engine.model.device)
            seconds += time.perf_counter() - t0
            got = [t for s in steps for t in s.tokens]
            tokens += len(got)
            reference.setdefault(i, (got, [m for s in steps for m in s.margins]))
            flip = first_flip(*reference[i], got)
            same += flip is None
            if flip is not None:
                flips.append({"prompt": i, **flip})
            metrics = getattr(engine.mode(mode), "metrics", None) or {}
            pipe = {k: v + metrics.get(k, 0) for k, v in pipe.items()}
        key = f"{mode} {label}"
        out[key] = {"tokens_per_s": round(tokens / seconds, 2), "tokens": tokens,
                    f"identical_to_ar_{reference['label']}": f"{same}/{len(prompts)}", "flips": flips}
        if pipe["steps"]:
            out[key] |= pipe | {"workers": pipeline.workers, "hit_rate": round(pipe["hits"] / max(pipe["spawned"], 1), 4)}
        print(f"  {key:22s} {out[key]}", flush=True)
    engine.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpoint", help="'default', a .gguf file or checkpoint folder: measure the modes on it")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,96,128")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--context", type=int, default=128, help="prompt tokens before ar decodes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", default="ht,ht-pld,pld", help="with --checkpoint only")
    p.add_argument("--pipeline-workers", type=int, default=2,
                   help="with --checkpoint: also `pipeline` with this many workers sharing the device (0: not)")
    p.add_argument("--skip-curve", action="store_true", help="modes only (a second call that brings the checkpoint)")
    p.add_argument("--graphs", default="off,on", help="with --checkpoint: the modes with CUDA graphs off, on, or both")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows, contexts = [int(x) for x in args.rows.split(",")], [int(x) for x in args.contexts.split(",")]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": rows, "contexts": contexts, "by_dtype": {}}
    with tempfile.TemporaryDirectory() as tmp:
        random = str(random_checkpoint(Path(tmp) / "random-smollm2-135m")) if not args.skip_curve else None
        for dtype in args.dtypes.split(","):
            entry = result["by_dtype"].setdefault(dtype, {})
            if random is not None:
                entry["curve"] = curve_and_ar(random, dtype, device, rows, contexts, args)
                write_profile(entry["curve"]["graphs on"], result, dtype, Path(args.out).with_name(f"profile-{dtype}.json"))
            if args.checkpoint and args.modes:
                graphs = tuple({"off": False, "on": True}[g] for g in args.graphs.split(","))
                entry["modes"] = mode_speeds(args.checkpoint, dtype, args.device, args.modes.split(","), args.new_tokens,
                                             args.pipeline_workers, graphs)
                entry["modes_checkpoint"] = args.checkpoint
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def write_profile(curve: dict, result: dict, dtype: str, path: Path) -> None:
    """The graphed t(n) as a `leapfrog profile` JSON, for `leapfrog sweep --project` and [tree_sizing] cost."""
    path.write_text(json.dumps({
        "model": "random weights, SmolLM2-135M shape", "dtype": dtype, "device": result["device"], "graphs": True,
        "torch": result["torch"], "what": "ms of one tree step over a chain of n rows after c cached positions "
        "(scripts/gpu_check.py, CUDA graphs on)", "rows": result["rows"], "contexts": result["contexts"],
        "ms_median": curve["t_ms_median"], "ms_min": curve["t_ms_min"],
    }, indent=1))


def curve_and_ar(checkpoint: str, dtype: str, device: torch.device, rows: list[int], contexts: list[int], args) -> dict:
    """t(n) and ar with graphs off, then on, on random weights of the real shape."""
    out, plain = {"checkpoint": "random weights, SmolLM2-135M shape"}, None
    for graphs in (False, True):
        model, _ = load_model(checkpoint, getattr(torch, dtype), device, cuda_graphs=graphs)
        if graphs and model.graphs is None:  # off CUDA: the padded layers, run eagerly
            model.use_graphs(GraphedLayers(model, capture=False))
        cache = decoding_cache(model, max(contexts) + max(rows) + args.new_tokens + args.context)
        engine = SimpleNamespace(model=model, cache=cache)
        entry = {"kernels": model.kernels.name, "t_ms_median": {}, "t_ms_min": {}}
        for c in contexts:
            entry["t_ms_median"][c], entry["t_ms_min"][c] = step_times(engine, rows, c, args.repeats)
            print(f"{dtype} graphs={graphs} c={c} t(n) ms: {entry['t_ms_median'][c]}", flush=True)
        entry["ar_tokens_per_s"], tokens, margins = ar_run(model, cache, args.context, args.new_tokens)
        if plain is None:
            plain = (tokens, margins)
        entry["ar_flip_against_graphs_off"] = first_flip(*plain, tokens)
        print(f"{dtype} graphs={graphs} ar: {entry['ar_tokens_per_s']} tokens/s, "
              f"flip: {entry['ar_flip_against_graphs_off']}", flush=True)
        out[f"graphs {'on' if graphs else 'off'}"] = entry
        del model, cache, engine
    return out


if __name__ == "__main__":
    main()

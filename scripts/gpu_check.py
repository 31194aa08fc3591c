"""One measurement run on a lent GPU (issue 14), prepared here and run there in one call:

    bash scripts/gpu_check.sh                      # OUT=folder, DEVICE=cuda by default

On `--device` (cuda, or cpu to try the script here) it measures, for each `--dtypes`:
  t(n)    one tree step against its rows n at a few context lengths (workers.cost_curve)
  ar      plain decoding tokens/s, `--new-tokens` tokens after a `--context`-token prompt
  modes   with a real checkpoint (one with a tokenizer): tokens/s of `--modes` against ar
          on the first Spec-Bench prompt of each category, and whether their tokens are ar's
Without `--checkpoint` the model has random weights of SmolLM2-135M's shape, which is all
speed needs (the real GGUF file, 98 MB, is over one device call's 64 MiB); drafts are then
never accepted, so the modes are skipped. Writes one JSON file.
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


def ar_speed(model, cache, context: int, new_tokens: int) -> float:
    prompt = torch.randint(0, model.args.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    list(generate_ar(model, cache, prompt, 8, set()))  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    n = sum(len(s.tokens) for s in generate_ar(model, cache, prompt, new_tokens, set()))
    sync(model.device)
    return round(n / (time.perf_counter() - t0), 2)


def mode_speeds(checkpoint: str, dtype: str, device: str, modes: list[str], new_tokens: int) -> dict:
    from configs.schema import ModelConfig
    from runtime.bench.prompts import default_prompts_path, load_prompts
    from runtime.engine import Engine

    engine = Engine(ModelConfig(checkpoint=checkpoint, dtype=dtype, device=device))
    prompts = [engine.encode_chat(p.text) for p in load_prompts(default_prompts_path(), None, 1)]
    out, reference = {}, {}
    for mode in ["ar", *modes]:
        list(engine.steps(prompts[0], mode, 8))  # warm-up
        tokens, seconds, same = 0, 0.0, 0
        for i, ids in enumerate(prompts):
            t0 = time.perf_counter()
            got = [t for s in engine.steps(ids, mode, new_tokens) for t in s.tokens]
            seconds += time.perf_counter() - t0
            tokens += len(got)
            reference.setdefault(i, got)
            same += got == reference[i]
        out[mode] = {"tokens_per_s": round(tokens / seconds, 2), "identical_to_ar": f"{same}/{len(prompts)}"}
        print(f"  {mode:10s} {out[mode]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpoint", help="a .gguf file or checkpoint folder (default: random weights of the real shape)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,96,128")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--context", type=int, default=128, help="prompt tokens before ar decodes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--modes", default="ht,ht-pld,pld", help="with a real checkpoint only")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    rows, contexts = [int(x) for x in args.rows.split(",")], [int(x) for x in args.contexts.split(",")]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "checkpoint": args.checkpoint or "random weights, SmolLM2-135M shape",
              "rows": rows, "contexts": contexts, "by_dtype": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(random_checkpoint(Path(tmp) / "random-smollm2-135m"))
        for dtype in args.dtypes.split(","):
            model, _ = load_model(checkpoint, getattr(torch, dtype), device)
            cache = decoding_cache(model, max(contexts) + max(rows) + args.new_tokens + args.context)
            engine = SimpleNamespace(model=model, cache=cache)
            entry = {"kernels": model.kernels.name, "t_ms_median": {}, "t_ms_min": {}}
            for c in contexts:
                entry["t_ms_median"][c], entry["t_ms_min"][c] = step_times(engine, rows, c, args.repeats)
                print(f"{dtype} c={c} t(n) ms: {entry['t_ms_median'][c]}", flush=True)
            entry["ar_tokens_per_s"] = ar_speed(model, cache, args.context, args.new_tokens)
            print(f"{dtype} ar: {entry['ar_tokens_per_s']} tokens/s", flush=True)
            del model, cache, engine
            if args.checkpoint and args.modes:
                entry["modes"] = mode_speeds(args.checkpoint, dtype, args.device, args.modes.split(","), args.new_tokens)
            result["by_dtype"][dtype] = entry
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

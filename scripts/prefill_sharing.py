"""Prefill apart or sharing a pass (issue 18): seven replies' one-token steps and one new
prompt, either as one pass of the steps and then the prefill on its own (what the batcher
did before prefills shared passes), or as one pass with the prompt's rows beside the steps
(what it does now: workers.batched_step.prompt_segment, the prompt rows on the kernels'
many-row path, the bfloat16 GEMM). Median ms of each, for each prompt length, in the main
thread or in another (where a server decodes).

    python scripts/prefill_sharing.py --lengths 16,32,64,96,128,256 --thread other
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.files import load_config  # noqa: E402
from runtime.bench.prompts import default_prompts_path, load_prompts  # noqa: E402
from runtime.decoding.autoregressive import prefill  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from workers.batched_step import Segment, batched_forward, one_token, prompt_segment  # noqa: E402


def median_ms(run, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return round(1000 * sorted(times)[repeats // 2], 2)


def measure(engine: Engine, lengths: list[int]) -> list[dict]:
    model, questions = engine.model, load_prompts(default_prompts_path(), None, None)
    replies = [engine.sibling() for _ in range(7)]
    new = engine.sibling().cache
    results = []
    with torch.inference_mode():
        for e, q in zip(replies, questions):
            prefill(model, e.cache, engine.encode_chat(q.text))
        long_text = [t for q in questions[10:20] for t in engine.encode_chat(q.text)]
        for n in lengths:
            prompt = long_text[:n]

            def steps() -> list[Segment]:  # each reply's next step (at the same position every time)
                return [one_token(model, e.cache, 100) for e in replies]

            def apart() -> None:
                new.truncate(0)
                batched_forward(model, steps())
                prefill(model, new, prompt)

            def shared() -> None:
                new.truncate(0)
                batched_forward(model, steps() + [prompt_segment(model, new, prompt)])

            results.append({"prompt": n, "steps alone": median_ms(lambda: batched_forward(model, steps())),
                            "apart": median_ms(apart), "shared": median_ms(shared)})
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16,32,64,96,128,256")
    p.add_argument("--thread", choices=["main", "other"], default="other")
    p.add_argument("--out")
    args = p.parse_args()
    config = load_config()
    config.model.dtype, config.runtime.threads = "bfloat16", 2
    engine = Engine.from_config(config)
    lengths = [int(x) for x in args.lengths.split(",")]
    out: list[dict] = []
    if args.thread == "main":
        out = measure(engine, lengths)
    else:
        t = threading.Thread(target=lambda: out.extend(measure(engine, lengths)))
        t.start()
        t.join()
    if args.out:
        Path(args.out).write_text(json.dumps({"thread": args.thread, "results": out}, indent=1))


if __name__ == "__main__":
    main()

"""Total tokens/s of N requests decoding at once, one thread each (what a server with
`[server] concurrency = N` runs), in each of --modes, three ways side by side (issue 18):

  separate   N engines, a model each, each stepping alone (servers before shared weights)
  shared     N sibling engines on one model (Engine.sibling), each stepping alone
  batched    N sibling engines whose steps (one-token or tree steps) share passes
             (workers.batched_step, what servers run now), trees sized for the pass

Each request decodes its share of Spec-Bench first turns, one after another. Prints one
line per (mode, N, way) and writes JSON with --out. With --timeline, each batched point
also reports its passes: how much of the wall time they ran, and how many steps and ms each.

    python scripts/batch_throughput.py --clients 1,2,4,8 --requests 16 --max-new-tokens 64 --out docs/bench/issue18-batched-ar.json
    python scripts/batch_throughput.py --modes ar,ht --ways shared,batched --out docs/bench/issue18-batched-trees.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.files import load_config  # noqa: E402
from runtime.bench.prompts import default_prompts_path, load_prompts  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from workers import batched_step  # noqa: E402
from workers.batched_step import BatchStats, StepBatcher  # noqa: E402


class PassTimeline:
    """Every pass's start, end and steps (it wraps batched_step.batched_forward, which each pass runs)."""

    def __init__(self):
        self.spans: list[tuple[float, float, int]] = []
        forward = batched_step.batched_forward

        def timed(model, segments):
            start = time.perf_counter()
            out = forward(model, segments)
            self.spans.append((start, time.perf_counter(), len(segments)))
            return out

        batched_step.batched_forward = timed

    def summary(self) -> dict:
        spans, self.spans = self.spans, []
        if not spans:
            return {}
        busy = sum(end - start for start, end, _ in spans)
        wall = spans[-1][1] - spans[0][0]
        return {"passes": len(spans), "busy_share": round(busy / wall, 3), "mean_pass_ms": round(1000 * busy / len(spans), 2),
                "spans": [(round(1000 * (a - spans[0][0]), 1), k, round(1000 * (b - a), 1)) for a, b, k in spans]}


def engines_for(way: str, n: int, config, first: Engine) -> list[Engine]:
    """N engines; `first` only holds the shared model (and the shared batcher)."""
    if way == "separate":
        return [Engine.from_config(config) for _ in range(n)]
    engines = [first.sibling() for _ in range(n)]  # batched: they share first.batcher
    if way == "shared":
        for e in engines:
            e.batcher = StepBatcher(e.model)  # a batcher of its own: every step alone
            e.lane = e.batcher.lane()
    return engines


def run(engines: list[Engine], prompts: list[list[int]], mode: str, max_new_tokens: int) -> dict:
    """Each engine's thread decodes prompts i, i + N, ...; total tokens/s over the wall time."""
    n = len(engines)
    tokens = [0] * n
    start = threading.Barrier(n + 1)

    def client(i: int) -> None:
        start.wait()
        for ids in prompts[i::n]:
            tokens[i] += sum(len(s.tokens) for s in engines[i].steps(ids, mode, max_new_tokens))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return {"tokens": sum(tokens), "seconds": round(seconds, 2), "tokens_per_s": round(sum(tokens) / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the process's)")
    p.add_argument("--ways", default="separate,shared,batched")
    p.add_argument("--modes", default="ar", help="decoding modes, comma-separated")
    p.add_argument("--timeline", action="store_true", help="time every batched pass (start ms, steps, ms) into the JSON")
    p.add_argument("--out")
    args = p.parse_args()
    timeline = PassTimeline() if args.timeline else None
    config = load_config()
    config.model.dtype, config.runtime.threads = args.dtype, args.threads
    first = Engine.from_config(config)
    prompts = [first.encode_chat(q.text) for q in load_prompts(default_prompts_path(), None, None)][: args.requests]
    results = []
    for mode in args.modes.split(","):
        list(first.steps(prompts[0], mode, 8))  # warm-up (and the cost curve a tree mode sizes by)
        for n in (int(x) for x in args.clients.split(",")):
            for way in args.ways.split(","):
                engines = engines_for(way, n, config, first)
                first.batcher.stats = BatchStats()  # counted afresh for this point
                if timeline:
                    timeline.summary()  # drop the warm-up's passes
                point = {"mode": mode, "clients": n, "way": way, **run(engines, prompts, mode, args.max_new_tokens)}
                if way == "batched":
                    point["passes"] = first.batcher.stats.summary()
                    if timeline:
                        point["timeline"] = timeline.summary()
                        print(f"  passes ran {100 * point['timeline']['busy_share']:.0f}% of the time, "
                              f"{point['timeline']['mean_pass_ms']} ms each", flush=True)
                results.append(point)
                print(f"{mode} {n} client(s), {way:8s}: {point['tokens_per_s']:7.1f} tokens/s ({point['tokens']} tokens in "
                      f"{point['seconds']} s){'  passes: ' + str(point['passes']) if way == 'batched' else ''}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                                              "requests": len(prompts), "results": results}, indent=1))


if __name__ == "__main__":
    main()

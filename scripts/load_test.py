"""Drive a running `leapfrog serve` with N concurrent streaming clients.

    python scripts/load_test.py --port 7860 --clients 4 --requests 16 --max-new-tokens 64 --mode ht-pld

Each client is one async Client (its own connection) that sends its share of the
requests one after another; prompts are the first turns of the bundled Spec-Bench
questions, taken in order. Measured at the client: time to first token (request sent ->
first chunk), inter-token latency (the gap before each chunk, spread evenly over the
tokens it carries: a chunk holds every token one decoding step accepted), end-to-end
latency per request, and total generated tokens/s over the wall time of the run. Prints
a summary and, with --out, writes it as JSON with the raw per-request numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.bench.prompts import default_prompts_path, load_prompts  # noqa: E402
from runtime.serving.client import Client  # noqa: E402


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": statistics.fmean(values), "max": values[-1]}


async def one_client(host: str, port: int, prompts: list[str], args) -> list[dict]:
    results = []
    async with Client(host, port, timeout=args.timeout) as client:
        for prompt in prompts:
            sent = time.perf_counter()
            last, first, gaps, tokens = sent, None, [], 0
            stream = client.stream(prompt, max_new_tokens=args.max_new_tokens, mode=args.mode)
            async for chunk in stream:
                now = time.perf_counter()
                if not chunk.token_ids:
                    continue
                if first is None:
                    first = now - sent
                else:
                    gaps += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                last, tokens = now, tokens + len(chunk.token_ids)
            s = stream.stats
            results.append({"ttft": first, "itl": gaps, "latency": last - sent, "tokens": tokens,
                            "queue": s.queue_seconds, "tau": s.tau, "server_seconds": s.seconds,
                            "batched_steps": s.batched_steps, "mean_pass_steps": s.mean_pass_steps,
                            "mean_step_rows": s.mean_step_rows})
    return results


async def run(args) -> dict:
    texts = [p.text for p in load_prompts(args.prompts or default_prompts_path())]
    texts = (texts * (args.requests // len(texts) + 1))[: args.requests]
    shares = [texts[i :: args.clients] for i in range(args.clients)]
    if args.warmup:  # one untimed request: first-call costs stay out of the numbers
        async with Client(args.host, args.port, timeout=args.timeout) as client:
            await client.generate(texts[0], max_new_tokens=8, mode=args.mode)
    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(args.host, args.port, share, args) for share in shares if share))
    wall = time.perf_counter() - start
    requests = [r for rs in per_client for r in rs]
    tokens = sum(r["tokens"] for r in requests)
    return {
        "clients": args.clients, "requests": len(requests), "max_new_tokens": args.max_new_tokens, "mode": args.mode,
        "wall_seconds": wall, "tokens": tokens, "tokens_per_second": tokens / wall,
        "ttft_seconds": percentiles([r["ttft"] for r in requests if r["ttft"] is not None]),
        "itl_seconds": percentiles([g for r in requests for g in r["itl"]]),
        "latency_seconds": percentiles([r["latency"] for r in requests]),
        "queue_seconds": percentiles([r["queue"] for r in requests]),
        "tau": statistics.fmean(r["tau"] for r in requests),
        # how the server batched the steps (runtime.serving.protocol.Stats): per request, averaged
        "mean_pass_steps": statistics.fmean(r["mean_pass_steps"] for r in requests),
        "mean_step_rows": statistics.fmean(r["mean_step_rows"] for r in requests),
        "per_request": requests,
    }


def summary(result: dict) -> str:
    ms = lambda d, k: f"{1000 * d[k]:.0f}"  # noqa: E731
    t, i, lat = result["ttft_seconds"], result["itl_seconds"], result["latency_seconds"]
    return (
        f"{result['clients']} clients, {result['requests']} requests x {result['max_new_tokens']} tokens, mode {result['mode']}: "
        f"{result['tokens_per_second']:.1f} tokens/s total ({result['tokens']} tokens in {result['wall_seconds']:.1f} s), tau {result['tau']:.2f}, "
        f"steps a pass {result['mean_pass_steps']:.2f}, rows a step {result['mean_step_rows']:.2f}\n"
        f"  TTFT ms p50 {ms(t, 'p50')} p90 {ms(t, 'p90')} p99 {ms(t, 'p99')} | "
        f"ITL ms p50 {ms(i, 'p50')} p90 {ms(i, 'p90')} p99 {ms(i, 'p99')} | "
        f"latency s p50 {lat['p50']:.2f} p90 {lat['p90']:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=16, help="requests in all, shared out among the clients")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mode", help="decoding mode (default: the server's)")
    parser.add_argument("--prompts", help="Spec-Bench-format JSONL (default: the bundled Spec-Bench)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a client waits for a frame")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(summary(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

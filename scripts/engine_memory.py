"""Resident memory of a server's engine pool (issue 18, shared weights): `[server]
concurrency` engines built as separate models (each Engine.from_config, as servers did
before) or as siblings on one model (Engine.sibling, runtime.serving.servers.engine_pool),
each with the default mode built and one short reply decoded. Each point runs in a fresh
process; prints one line per point and writes JSON with --out.

    python scripts/engine_memory.py --engines 1,2,4,8 --dtype bfloat16 --out docs/bench/issue18-engine-memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(engines: int, shared: bool, dtype: str) -> dict:
    """In this process: build the pool, decode 16 tokens on each engine, report RSS."""
    sys.path.insert(0, str(ROOT))
    from configs.files import load_config
    from runtime.engine import Engine
    from runtime.serving.servers import engine_pool

    config = load_config()
    config.model.dtype, config.server.concurrency, config.runtime.threads = dtype, engines, 2
    before = rss_mb()
    if shared:
        pool = engine_pool(config)
    else:
        pool = [Engine.from_config(config) for _ in range(engines)]
        for e in pool:
            e.mode(config.generation.mode)
    for e in pool:
        list(e.steps(e.encode_chat("Say hello."), config.generation.mode, 16))
    return {"engines": engines, "shared": shared, "dtype": dtype, "mode": config.generation.mode,
            "rss_mb": round(rss_mb(), 1), "rss_before_mb": round(before, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="1,2,4,8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "N,shared" in a child process
    args = p.parse_args()
    if args.one:
        n, shared = args.one.split(",")
        print(json.dumps(measure(int(n), shared == "1", args.dtype)))
        return
    points = []
    for n in (int(x) for x in args.engines.split(",")):
        for shared in (False, True):
            out = subprocess.run([sys.executable, __file__, "--one", f"{n},{int(shared)}", "--dtype", args.dtype],
                                 capture_output=True, text=True, check=True).stdout
            points.append(json.loads(out.strip().splitlines()[-1]))
            point = points[-1]
            print(f"{n} engine(s), {'one shared model' if shared else 'a model each'}: {point['rss_mb']:.0f} MB resident",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()

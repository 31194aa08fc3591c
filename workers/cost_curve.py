"""This device's cost curve t(n): the time of one tree step against its rows (`leapfrog profile`).

A tree step's cost on a given device, model and dtype depends mostly on how many rows it
runs (tree nodes plus pseudo states) and on the context it attends to. The drafting and
pipeline code size their trees from this curve instead of assuming a node is free. For
each context length c and row count n it times `tree_step` (workers.tree_step) over a
chain of n nodes after c cached positions: the forward, the LM head over the n rows, the
acceptance walk and the cache compaction, as decoding runs them (greedy, no pseudo
states: a drafter's pseudo states count as rows of their own). The cache is cut back to
c after every run. It reports the median and the minimum of `repeats` runs, in ms; tree sizing reads the
minimum (workers.tree_sizing.CostCurve), as a busy machine only ever adds time.
`engine` here is anything with the model, its cache and its ModelConfig (runtime.engine.Engine).

`device_profile` is the one the tree modes size their trees by ([tree_sizing] cost =
"auto"): a shorter curve, measured the first time a model shape, dtype, kernel set,
thread count and device meet, and cached in cache_dir()/profiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from workers.cache_dir import cache_dir
from workers.cpu_info import cpu_info
from workers.drafters.pseudo_forward import run_to_end
from workers.kernels import native
from workers.sampling import Greedy
from workers.tree import chain
from workers.tree_step import tree_step

ROWS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
CONTEXTS = [128, 512, 1024]
# device_profile's curve: the sizes a CPU tree takes (a GPU's flat curve keeps the largest), ~5 s here.
QUICK_ROWS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
QUICK_CONTEXTS = [128, 1024]
QUICK_REPEATS = 5


@torch.inference_mode()
def step_times(engine, rows: list[int], context: int, repeats: int, bar=None) -> tuple[dict[int, float], dict[int, float]]:
    """(median ms, min ms) of a tree step of n rows after `context` cached positions, per n.
    The row counts take turns, round after round, so that a busy moment of the machine
    slows every n alike instead of one n's every run."""
    model, cache = engine.model, engine.cache
    g = torch.Generator().manual_seed(context)
    cache.truncate(0)
    prefix = torch.randint(0, model.args.vocab_size, (context + max(rows),), generator=g).tolist()
    run_to_end(tree_step(model, cache, chain(prefix[context - 1], []), Greedy(), 0, prefix[: context - 1]))
    trees = {n: chain(prefix[context], prefix[context + 1 : context + n]) for n in rows}
    times: dict[int, list[float]] = {n: [] for n in rows}
    for round_ in range(repeats + 1):  # the first round warms the shapes up and is not counted
        for n in rows:
            t0 = time.perf_counter()
            run_to_end(tree_step(model, cache, trees[n], Greedy(), 0))
            if round_:
                times[n].append(time.perf_counter() - t0)
            cache.truncate(context)
            if bar is not None:
                bar.update()
    cache.truncate(0)
    median = {n: round(1000 * statistics.median(t), 3) for n, t in times.items()}
    return median, {n: round(1000 * min(t), 3) for n, t in times.items()}


def cost_curve(engine, rows: list[int] = ROWS, contexts: list[int] = CONTEXTS, repeats: int = 5,
               progress: bool = True) -> dict:
    """t(n) at every context: a JSON-ready profile of this device."""
    too_long = [c for c in contexts if c + max(rows) > engine.config.max_context]
    if too_long:
        raise ValueError(f"contexts {too_long} + {max(rows)} rows exceed max_context {engine.config.max_context}")
    bar = tqdm(total=len(rows) * len(contexts) * (repeats + 1), desc="profile", unit="step", disable=not progress, file=sys.stderr)
    ms, ms_min = {}, {}
    for c in contexts:
        ms[c], ms_min[c] = step_times(engine, rows, c, repeats, bar)
    bar.close()
    return {
        "model": engine.config.checkpoint, "dtype": engine.config.dtype, "device": str(engine.model.device),
        "cpu": cpu_info(), "graphs": engine.model.graphs is not None, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "repeats": repeats,
        "what": "ms of one tree step (forward, LM head, accept, KV keep) over a chain of n rows after c cached positions",
        "rows": rows, "contexts": contexts, "ms_median": ms, "ms_min": ms_min,
    }


def device_name(device) -> str:
    if device.type == "cuda":
        import torch.cuda

        return torch.cuda.get_device_name(device)
    info = cpu_info()
    return f"{info['model']} ({info['class']})"


def profile_key(engine) -> dict:
    """What a step's cost depends on: the model's shape, dtype, weights, kernels (the native kernels'
    build: a changed kernel measures anew), CUDA graphs, threads and device."""
    model = engine.model
    kernels = model.kernels.name
    if kernels == "native":
        kernels = f"native {native.build_dir().name} {native.path_on()}"
    # Shipped (quantized) weights cost otherwise; float keys stay as they were (cached curves hold).
    weights = {"weights": engine.config.weights} if engine.config.weights != "float" else {}
    return weights | {"model": asdict(model.args), "dtype": engine.config.dtype, "kernels": kernels,
            "graphs": model.graphs is not None, "threads": torch.get_num_threads(),
            "device": device_name(model.device), "cpu_flags": cpu_info()["flags"], "torch": torch.__version__}


def busy_while_measuring() -> str | None:
    """Why a curve just measured should not be cached, or None: the last minute's load
    average above 1.5 runnable threads a core means other work shared the cores, and a
    curve measured then (every row count several times slower) would size every later
    tree for a machine that is not this one."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    return f"load {load:.1f} on {cores} cores" if load > 1.5 * cores else None


def device_profile(engine, progress: bool = True) -> dict:
    """This engine's quick cost curve, from the cache or measured now (and cached)."""
    key = profile_key(engine)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "profiles" / f"{digest}.json"
    try:
        profile = json.loads(path.read_text())
        if profile.get("key") == key:
            return profile
    except (OSError, ValueError):
        pass
    room = engine.config.max_context
    rows = [n for n in QUICK_ROWS if n <= room // 2] or [1, 2]
    contexts = [c for c in QUICK_CONTEXTS if c + max(rows) <= room] or [room - max(rows)]
    if progress:
        print(f"measuring this device's tree-step cost once (cached in {path.parent})", file=sys.stderr)
    profile = cost_curve(engine, rows, contexts, QUICK_REPEATS, progress) | {"key": key}
    busy = busy_while_measuring()
    if busy is not None:  # other work shared the cores: right for now, wrong to keep
        profile["busy"] = busy
        print(f"the tree-step cost was measured while the machine was busy ({busy}): used by this process, "
              "not cached; it is measured again next time", file=sys.stderr)
        return profile
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(profile, indent=1))
    partial.replace(path)  # atomic: engines measuring at once each write a whole file
    return profile

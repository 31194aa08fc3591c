"""This device's cost curve t(n): the time of one tree step against its rows (`leapfrog profile`).

A tree step's cost on a given device, model and dtype depends mostly on how many rows it
runs (tree nodes plus pseudo states) and on the context it attends to. The drafting and
pipeline code size their trees from this curve instead of assuming a node is free. For
each context length c and row count n it times `tree_step` (workers.tree_step) over a
chain of n nodes after c cached positions: the forward, the LM head over the n rows, the
acceptance walk and the cache compaction, as decoding runs them (greedy, no pseudo
states: a drafter's pseudo states count as rows of their own). The cache is cut back to
c after every run. It reports the median and the minimum of `repeats` runs, in ms.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm import tqdm

from workers.drafters.pseudo_forward import run_to_end
from workers.sampling import Greedy
from workers.tree import chain
from workers.tree_step import tree_step

ROWS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
CONTEXTS = [128, 512, 1024]


@torch.inference_mode()
def step_times(engine, rows: list[int], context: int, repeats: int, bar=None) -> tuple[dict[int, float], dict[int, float]]:
    """(median ms, min ms) of a tree step of n rows after `context` cached positions, per n."""
    model, cache = engine.model, engine.cache
    g = torch.Generator().manual_seed(context)
    cache.truncate(0)
    prefix = torch.randint(0, model.args.vocab_size, (context + max(rows),), generator=g).tolist()
    run_to_end(tree_step(model, cache, chain(prefix[context - 1], []), Greedy(), 0, prefix[: context - 1]))
    median, best = {}, {}
    for n in rows:
        tree = chain(prefix[context], prefix[context + 1 : context + n])
        times = []
        for _ in range(repeats + 1):  # the first run warms the shapes up and is not counted
            t0 = time.perf_counter()
            run_to_end(tree_step(model, cache, tree, Greedy(), 0))
            times.append(time.perf_counter() - t0)
            cache.truncate(context)
        median[n], best[n] = round(1000 * statistics.median(times[1:]), 3), round(1000 * min(times[1:]), 3)
        if bar is not None:
            bar.update()
    cache.truncate(0)
    return median, best


def cost_curve(engine, rows: list[int] = ROWS, contexts: list[int] = CONTEXTS, repeats: int = 5,
               progress: bool = True) -> dict:
    """t(n) at every context: a JSON-ready profile of this device."""
    too_long = [c for c in contexts if c + max(rows) > engine.config.max_context]
    if too_long:
        raise ValueError(f"contexts {too_long} + {max(rows)} rows exceed max_context {engine.config.max_context}")
    bar = tqdm(total=len(rows) * len(contexts), desc="profile", unit="shape", disable=not progress, file=sys.stderr)
    ms, ms_min = {}, {}
    for c in contexts:
        ms[c], ms_min[c] = step_times(engine, rows, c, repeats, bar)
    bar.close()
    return {
        "model": engine.config.checkpoint, "dtype": engine.config.dtype, "device": str(engine.model.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
        "what": "ms of one tree step (forward, LM head, accept, KV keep) over a chain of n rows after c cached positions",
        "rows": rows, "contexts": contexts, "ms_median": ms, "ms_min": ms_min,
    }

"""Ray for the pipelined runtime: join the cluster a `ray job submit` runs in, or start a
local one sized for the workers (and stop it at exit)."""

from __future__ import annotations

import atexit
import os

# The object store holds only small messages here; keep it from claiming a share of RAM.
OBJECT_STORE_BYTES = 256 * 1024**2


def ensure_ray(workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`, or pointed at a cluster
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # A private cluster of this process: no token to hand out (Ray warns otherwise).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # One CPU per worker at least: more workers than cores time-share them (and say so in sweeps).
        ray.init(
            num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False, configure_logging=False,
        )
        atexit.register(ray.shutdown)

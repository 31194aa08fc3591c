"""Ray for the pipelined runtime: join the cluster a `ray job submit` runs in, or start a
local one sized for the workers (and stop it at exit)."""

from __future__ import annotations

import atexit
import logging
import os
import secrets

# The object store holds only small messages here; keep it from claiming a share of RAM.
OBJECT_STORE_BYTES = 256 * 1024**2


def ensure_ray(workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`, or pointed at a cluster
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # A private cluster of this process, with Ray's token auth on. Ray turns it on for
        # a new local cluster when RAY_AUTH_MODE is unset, and says so in a warning; this
        # function used to set RAY_AUTH_MODE=disabled only to silence that warning, which
        # left the cluster's ports open to every user of the machine. Now the token is a
        # fresh random one in this process's environment (Ray's processes inherit it, and
        # nothing is written to ~/.ray), and only the notice that auth is on is muted.
        if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # One CPU per worker at least: more workers than cores time-share them (and say so in sweeps).
        ray.init(
            num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False, configure_logging=False,
        )
        atexit.register(ray.shutdown)

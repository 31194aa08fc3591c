"""Where Leapfrog keeps what it makes once per machine: converted checkpoints, built
kernels, distillation data, llama.cpp requantizations ($LEAPFROG_CACHE, default
~/.cache/leapfrog)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LEAPFROG_CACHE", Path.home() / ".cache" / "leapfrog"))

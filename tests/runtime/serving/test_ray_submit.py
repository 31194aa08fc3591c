"""scripts/ray_submit.py quotes the job's arguments (issue 17: they were joined with spaces
into a shell command)."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "ray_submit.py"


def test_the_entrypoint_quotes_every_argument():
    spec = importlib.util.spec_from_file_location("ray_submit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--config", "my configs/a b.toml", "--host", "0.0.0.0; touch /tmp/owned", "$(id)"]
    command = module.entrypoint(args)
    assert shlex.split(command) == ["python", "-m", "runtime.serving.ray_job", *args]

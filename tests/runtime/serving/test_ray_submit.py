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


def test_the_docs_do_not_open_the_job_api_to_everyone():
    """docs/serving.md told users to run `ray start --head --dashboard-host 0.0.0.0`: an
    unauthenticated job API that runs code for anyone who reaches it (issue 17)."""
    docs = (SCRIPT.parents[1] / "docs" / "serving.md").read_text()
    commands = [line for line in docs.splitlines() if "ray start" in line and not line.startswith(("`", "Tested"))]
    assert commands and not [c for c in commands if "0.0.0.0" in c or "RAY_AUTH_MODE=disabled" in c]
    assert "RAY_AUTH_MODE=token ray start --head" in docs and "ssh -N -L 8265:127.0.0.1:8265" in docs

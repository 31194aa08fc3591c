"""The private Ray cluster of the pipelined modes keeps Ray's token auth on (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CHECK = """
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from runtime.pipeline.cluster import ensure_ray
ensure_ray(1)
assert get_authentication_mode() == AuthenticationMode.TOKEN, get_authentication_mode()
assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
print("token auth on")
"""


def test_the_private_cluster_keeps_token_auth_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "token auth on" in out.stdout, out.stderr[-3000:]
    assert "Token authentication is disabled" not in out.stderr
    assert not (tmp_path / ".ray" / "auth_token").exists()  # the token stayed in the environment

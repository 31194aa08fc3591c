"""`ray job submit` deployment end to end on a loopback Ray cluster started by this test:
submit `python -m runtime.serving.ray_job` through the job API (scripts/ray_submit.py's path), stream
from the replica with the native client, stop the job, shut the cluster down."""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

# Ray reads this when imported: keep every address of the test cluster on the loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray's token auth stays on (issue 17); the token of this throwaway cluster lives in the
# environment (inherited by Ray's processes and the job), so nothing is written to ~/.ray.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray")
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from runtime.serving.client import SyncClient  # noqa: E402

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[3]  # the project: tests/runtime/serving/ is three below


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_serves_and_stops():
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
                       _node_ip_address="127.0.0.1")
    try:
        jobs = JobSubmissionClient(f"http://{context.dashboard_url}")
        job = jobs.submit_job(
            # This interpreter: the job's PATH is the test's, which need not lead to the venv.
            entrypoint=f"{sys.executable} -m runtime.serving.ray_job --host 127.0.0.1 --port 0 --http-port -1 --cpus 0",
            runtime_env={"working_dir": str(ROOT), "excludes": [".venv", "out", ".git", "__pycache__"]},
        )

        def address():
            if jobs.get_job_status(job) in (JobStatus.FAILED, JobStatus.STOPPED):
                raise AssertionError(jobs.get_job_logs(job))
            return re.search(r"leapfrog replica 0: native (\S+):(\d+)", jobs.get_job_logs(job))

        match = wait_for(address, 180, "the replica's address")
        assert match[1] == "127.0.0.1"
        with SyncClient(match[1], int(match[2]), timeout=60) as client:
            reply = client.generate("Name three colours.", max_new_tokens=12)
        assert reply.stats.tokens == 12 and reply.text
        jobs.stop_job(job)
        wait_for(lambda: jobs.get_job_status(job) == JobStatus.STOPPED, 60, "the job to stop")
    finally:
        ray.shutdown()


def test_replicas_get_ports_of_their_own():
    from configs.schema import LeapfrogConfig, ServerConfig
    from runtime.serving.ray_job import replica_config

    config = LeapfrogConfig(server=ServerConfig(port=7860, http_port=7861))
    ports = [(c.server.port, c.server.http_port) for c in (replica_config(config, i) for i in range(3))]
    assert ports == [(7860, 7861), (7862, 7863), (7864, 7865)]
    assert config.server.port == 7860  # the original is not changed
    loose = replica_config(LeapfrogConfig(server=ServerConfig(port=0, http_port=-1)), 2).server
    assert (loose.port, loose.http_port) == (0, -1)


class FakeReplica:
    def __init__(self, index: int, generation: int):
        self.index, self.generation = index, generation
        self.healthy = True


def test_the_driver_replaces_a_dead_replica_and_every_wait_has_a_timeout():
    """Issue 17: one replica's death took the job down, and ray.get waited forever."""
    import io

    from runtime.serving.ray_job import Supervisor

    started, killed, timeouts = [], [], []

    def start(i):
        started.append(FakeReplica(i, sum(r.index == i for r in started)))
        return started[-1]

    def addresses(replica, timeout):
        timeouts.append(timeout)
        return {"native": ("127.0.0.1", 7860 + 2 * replica.index), "http": None}

    def alive(replica, timeout):
        timeouts.append(timeout)
        if replica.healthy == "hung":
            raise TimeoutError("no answer")  # what ray.get(..., timeout) raises as GetTimeoutError
        if replica.healthy == "dead":
            raise RuntimeError("The actor died unexpectedly")  # as RayActorError
        return replica.healthy

    out = io.StringIO()
    supervisor = Supervisor(start, addresses, alive, killed.append, start_timeout=9.0, probe_timeout=1.0, out=out)
    supervisor.start_all(3)
    supervisor.check()
    assert supervisor.restarts == 0
    started[0].healthy, started[1].healthy, started[2].healthy = "dead", False, True
    supervisor.check()
    assert [r.index for r in killed] == [0, 1] and supervisor.restarts == 2
    assert [(r.index, r.generation) for r in supervisor.replicas] == [(0, 1), (1, 1), (2, 0)]
    supervisor.replicas[2].healthy = "hung"
    supervisor.check()
    assert supervisor.replicas[2].generation == 1 and supervisor.restarts == 3
    assert out.getvalue().count("leapfrog replica 0: native 127.0.0.1:7860") == 2
    assert None not in timeouts and set(timeouts) == {9.0, 1.0}

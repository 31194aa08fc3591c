"""Submit the Leapfrog service to a Ray cluster as a job and print where clients connect.

    python scripts/ray_submit.py --address http://HEAD:8265 -- --config configs/default.toml --replicas 2

is `ray job submit --working-dir . -- python -m runtime.serving.ray_job ARGS`, plus waiting until
every replica listens: it prints the job id, the replicas' addresses and the command that
stops the job, then exits (the job keeps running). Exit code 1 if the job fails first.
The repository root is the working directory shipped to the cluster (.venv, out/ and
.git are left out); the cluster's Python must have this project's dependencies.
$LEAPFROG_API_KEY, when set here, is passed on to the job (the service's API key).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = Path(__file__).resolve().parent.parent
READY = "replica(s) serving"
API_KEY_ENV = "LEAPFROG_API_KEY"  # as runtime.serving.servers reads it


def entrypoint(serve_args: list[str]) -> str:
    """The job's shell command, every argument quoted: a path with a space, or a ';', stays
    one argument and never becomes a command of its own."""
    return shlex.join(["python", "-m", "runtime.serving.ray_job", *serve_args])


def runtime_env() -> dict:
    """The code to ship, and the service's API key when this shell has one ($LEAPFROG_API_KEY)."""
    env = {"working_dir": str(ROOT), "excludes": [".venv", "out", ".git", "__pycache__"]}
    if os.environ.get(API_KEY_ENV):
        env["env_vars"] = {API_KEY_ENV: os.environ[API_KEY_ENV]}
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's job server (dashboard) address")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the replicas to listen")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then arguments of python -m runtime.serving.ray_job")
    args = parser.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args

    client = JobSubmissionClient(args.address)
    job = client.submit_job(
        entrypoint=entrypoint(serve_args),
        runtime_env=runtime_env(),
    )
    print(f"submitted job {job}", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        logs = client.get_job_logs(job)
        if READY in logs:
            for line in logs.splitlines():
                if line.startswith("leapfrog"):
                    print(line)
            print(f"stop it with: ray job stop --address {args.address} {job}")
            return 0
        status = client.get_job_status(job)
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
            print(f"job {job} ended ({status}) before serving:\n{logs}", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"job {job} is not serving after {args.timeout:g} s; its logs:\n{client.get_job_logs(job)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

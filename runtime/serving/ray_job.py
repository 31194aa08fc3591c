"""The service on a Ray cluster: the entrypoint of `ray job submit`.

    ray job submit --working-dir . -- python -m runtime.serving.ray_job --config configs/cluster.toml

The job's driver starts `--replicas` actors, each asking Ray for `--gpus` GPUs (default:
1 when the cluster has GPUs, else 0), so each replica lands on a GPU of its own. Each
actor loads the engines of the config on its node and runs the full server there (native
protocol and OpenAI endpoint, runtime.serving.servers). The driver prints one line per replica,

    leapfrog replica 0: native 10.0.0.5:7860 http http://10.0.0.5:7861/v1

which clients connect to, then watches the replicas until the job is stopped (`ray job
stop` ends the driver, and Ray ends its actors with it). With [server] host = "0.0.0.0"
the replicas listen on every interface and report their node's address; with a loopback
host they report that. Replica i listens on port + 2i and http_port + 2i, so replicas that
share a node do not collide (port 0: any free port).

A replica is a whole model on one device. A replica whose default mode is `pipeline` or
`async` runs its decode workers as Ray actors of their own on the same cluster
(runtime.pipeline).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time

import ray

from configs.files import load_config
from configs.schema import ConfigError, LeapfrogConfig
from runtime.engine import Engine
from runtime.serving.servers import run_servers, secure


@ray.remote
class Replica:
    """One copy of the service, run by a thread of its own with its own event loop."""

    def __init__(self, config: LeapfrogConfig):
        import uvloop

        engines = [Engine.from_config(config) for _ in range(config.server.concurrency)]
        for engine in engines:
            engine.mode(config.generation.mode)
        self._addresses: dict | None = None
        self._failure: BaseException | None = None
        ready = threading.Event()

        def on_ready(native, http) -> None:
            self._addresses = {"native": native, "http": http}
            ready.set()

        def run() -> None:
            try:
                uvloop.run(run_servers(engines, config, on_ready))
            except BaseException as e:  # noqa: BLE001 - reported to the driver by addresses()
                self._failure = e
                ready.set()

        threading.Thread(target=run, name="leapfrog-serve", daemon=True).start()
        ready.wait()

    def addresses(self) -> dict:
        """{"native": (host, port), "http": (host, port) or None}, as clients reach them."""
        if self._failure is not None:
            raise RuntimeError(f"the server did not start: {self._failure}")
        node = ray.util.get_node_ip_address()
        reach = lambda a: None if a is None else (node if a[0] in ("0.0.0.0", "::") else a[0], a[1])  # noqa: E731
        return {key: reach(value) for key, value in self._addresses.items()}

    def alive(self) -> bool:
        return self._failure is None


def replica_config(config: LeapfrogConfig, index: int) -> LeapfrogConfig:
    s = config.server
    shift = lambda port: port if port <= 0 else port + 2 * index  # noqa: E731
    return dataclasses.replace(config, server=dataclasses.replace(s, port=shift(s.port), http_port=shift(s.http_port)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serving.ray_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML config file (default: configs/default.toml)")
    parser.add_argument("--replicas", type=int, default=1, help="copies of the service, one actor each (default 1)")
    parser.add_argument("--gpus", type=float, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--cpus", type=float, default=1, help="CPUs Ray reserves per replica (default 1)")
    parser.add_argument("--address", default="auto", help="Ray cluster to join (default: the job's own)")
    parser.add_argument("--host", help="override [server] host")
    parser.add_argument("--port", type=int, help="override [server] port")
    parser.add_argument("--http-port", type=int, help="override [server] http_port")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        for key in ("host", "port", "http_port"):
            if getattr(args, key) is not None:
                setattr(config.server, key, getattr(args, key))
        config.validate()
        secure(config)  # here too, so that a refused exposure fails the job at once
        if args.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {args.replicas}")
    except ConfigError as e:
        print(f"runtime.serving.ray_job: error: {e}", file=sys.stderr)
        return 2

    ray.init(address=args.address, log_to_driver=True)
    gpus = args.gpus if args.gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
    replicas = [Replica.options(num_gpus=gpus, num_cpus=args.cpus).remote(replica_config(config, i))
                for i in range(args.replicas)]
    for i, addresses in enumerate(ray.get([r.addresses.remote() for r in replicas])):
        native, http = addresses["native"], addresses["http"]
        line = f"leapfrog replica {i}: native {native[0]}:{native[1]}"
        if http is not None:
            line += f" http http://{http[0]}:{http[1]}/v1"
        print(line, flush=True)
    print(f"leapfrog: {len(replicas)} replica(s) serving, {gpus:g} GPU(s) each; `ray job stop` ends them", flush=True)
    try:
        while all(ray.get([r.alive.remote() for r in replicas])):
            time.sleep(5)
        print("leapfrog: a replica's server stopped", file=sys.stderr)
    except ray.exceptions.RayActorError as e:
        print(f"leapfrog: a replica died: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

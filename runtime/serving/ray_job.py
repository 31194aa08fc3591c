"""The service on a Ray cluster: the entrypoint of `ray job submit`.

    ray job submit --working-dir . -- python -m runtime.serving.ray_job --config configs/cluster.toml

The job's driver starts `--replicas` actors, each asking Ray for `--gpus` GPUs (default:
1 when the cluster has GPUs, else 0), so each replica lands on a GPU of its own. Each
actor loads the engines of the config on its node and runs the full server there (native
protocol and OpenAI endpoint, runtime.serving.servers). The driver prints one line per replica,

    leapfrog replica 0: native 10.0.0.5:7860 http http://10.0.0.5:7861/v1

which clients connect to, then watches the replicas until the job is stopped (`ray job
stop` ends the driver, and Ray ends its actors with it). A replica that dies, stops
serving or does not answer a health check in time is replaced by a new one (its line is
printed again); every wait on Ray has a timeout, so a hung replica cannot hang the driver. With [server] host = "0.0.0.0"
the replicas listen on every interface and report their node's address; with a loopback
host they report that. Replica i listens on port + 2i and http_port + 2i, so replicas that
share a node do not collide (port 0: any free port).

A replica is a whole model on one device. A replica whose default mode is `pipeline` or
`async` runs its decode workers as Ray actors of their own on the same cluster
(runtime.pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import threading
import time

import ray

from configs.files import load_config
from configs.schema import ConfigError, LeapfrogConfig
from runtime.serving.servers import engine_pool, run_servers, secure

START_TIMEOUT = 1800.0  # seconds a replica may take to load its model (a first GGUF conversion too) and listen
PROBE_TIMEOUT = 60.0  # seconds a replica may take to answer a health check
PROBE_EVERY = 5.0  # seconds between health checks


@ray.remote
class Replica:
    """One copy of the service, run by a thread of its own with its own event loop."""

    def __init__(self, config: LeapfrogConfig):
        import uvloop

        engines = engine_pool(config)
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
        if not ready.wait(START_TIMEOUT):
            self._failure = TimeoutError(f"the server did not listen within {START_TIMEOUT:g} s")

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


class Supervisor:
    """Starts the replicas and keeps them serving: each round asks every replica whether
    its server runs; one that says no, raises or does not answer in time is killed and
    started again on the same ports. The Ray calls are passed in (start, addresses,
    alive, kill), each wait with its timeout, so the logic is tested without a cluster."""

    def __init__(self, start, addresses, alive, kill, start_timeout: float = START_TIMEOUT,
                 probe_timeout: float = PROBE_TIMEOUT, out=sys.stdout):
        self.start, self.addresses, self.alive, self.kill = start, addresses, alive, kill
        self.start_timeout, self.probe_timeout, self.out = start_timeout, probe_timeout, out
        self.replicas: list = []
        self.restarts = 0

    def start_all(self, count: int) -> None:
        """Start `count` replicas and print their addresses; raises if one cannot start."""
        self.replicas = [self.start(i) for i in range(count)]
        for i, replica in enumerate(self.replicas):
            self._announce(i, self.addresses(replica, self.start_timeout))

    def check(self) -> None:
        """One round of health checks, replacing every replica that fails its check."""
        for i, replica in enumerate(self.replicas):
            try:
                healthy = self.alive(replica, self.probe_timeout)
            except Exception as e:  # noqa: BLE001 - dead, hung or broken: any failure means replace it
                healthy, why = False, f"{type(e).__name__}: {e}"
            else:
                why = "its server stopped"
            if healthy:
                continue
            print(f"leapfrog: replica {i} failed ({why}); starting a new one", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self.kill(replica)
            self.replicas[i] = self.start(i)
            self.restarts += 1
            try:
                self._announce(i, self.addresses(self.replicas[i], self.start_timeout))
            except Exception as e:  # noqa: BLE001 - it fails its next check and is replaced again
                print(f"leapfrog: replica {i} did not start ({type(e).__name__}: {e}); retrying", file=sys.stderr, flush=True)

    def _announce(self, i: int, addresses: dict) -> None:
        native, http = addresses["native"], addresses["http"]
        line = f"leapfrog replica {i}: native {native[0]}:{native[1]}"
        if http is not None:
            line += f" http http://{http[0]}:{http[1]}/v1"
        print(line, file=self.out, flush=True)


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
    supervisor = Supervisor(
        start=lambda i: Replica.options(num_gpus=gpus, num_cpus=args.cpus).remote(replica_config(config, i)),
        addresses=lambda replica, timeout: ray.get(replica.addresses.remote(), timeout=timeout),
        alive=lambda replica, timeout: ray.get(replica.alive.remote(), timeout=timeout),
        kill=ray.kill,
    )
    try:
        supervisor.start_all(args.replicas)
    except Exception as e:  # noqa: BLE001 - a replica that cannot start at all: the config is wrong
        print(f"leapfrog: a replica did not start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"leapfrog: {args.replicas} replica(s) serving, {gpus:g} GPU(s) each; `ray job stop` ends them", flush=True)
    try:
        while True:
            time.sleep(PROBE_EVERY)
            supervisor.check()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

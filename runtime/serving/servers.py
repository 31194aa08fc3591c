"""`leapfrog serve`: the native server and the OpenAI endpoint on one Service, until stopped.

Both front ends (runtime.serving.native_server, runtime.serving.openai_api) share the
Service (runtime.serving.service) that checks, queues and decodes every request; the CLI
(`leapfrog serve`) and the Ray job (runtime.serving.ray_job) call `run_servers`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

from configs.schema import ConfigError, LeapfrogConfig
from runtime.engine import Engine
from runtime.serving.limits import is_loopback
from runtime.serving.native_server import NativeServer
from runtime.serving.openai_api import OpenAIApi
from runtime.serving.service import Service
from workers.loading import default_gguf_path


def model_name(checkpoint: str) -> str:
    """The name /v1/models reports: the checkpoint's file or folder name."""
    if checkpoint == "default":
        return default_gguf_path().stem
    return Path(checkpoint).name.removesuffix(".gguf")


API_KEY_ENV = "LEAPFROG_API_KEY"


def secure(config: LeapfrogConfig) -> LeapfrogConfig:
    """Settle who may connect: [server] api_key, else $LEAPFROG_API_KEY. Listening beyond
    the loopback without a key is refused (ConfigError) unless [server] insecure is set."""
    s = config.server
    s.api_key = s.api_key or os.environ.get(API_KEY_ENV, "")
    if not s.api_key and not s.insecure and not is_loopback(s.host):
        raise ConfigError(f"listening on {s.host} (beyond the loopback) needs an API key: --api-key, ${API_KEY_ENV} "
                          "or [server] api_key; or --insecure to serve anyone who can reach it, on purpose")
    return config


def engine_pool(config: LeapfrogConfig) -> list[Engine]:
    """`[server] concurrency` engines on one model in memory (Engine.sibling: a KV cache each),
    with the default mode built in each (its drafter weights loaded) before the first request."""
    first = Engine.from_config(config)
    engines = [first] + [first.sibling() for _ in range(config.server.concurrency - 1)]
    for engine in engines:
        engine.mode(config.generation.mode)
    return engines


async def run_servers(engines: list, config: LeapfrogConfig, ready=None) -> None:
    """Run the native server and (unless http_port is -1) the OpenAI endpoint on `engines`
    until cancelled. `ready((host, port), http_address_or_None)` is called once both listen."""
    secure(config)
    service = Service(engines, config)
    server = NativeServer(service, config.server)
    api = OpenAIApi(service, model_name(config.model.checkpoint)) if config.server.http_port >= 0 else None
    try:
        address = await server.start()
        http = await api.start(config.server.host, config.server.http_port) if api else None
        if ready is not None:
            ready(address, http)
        stop = asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)  # `ray job stop`, `kill`
        await stop.wait()  # until SIGTERM, or cancelled (Ctrl-C)
    finally:
        if api is not None:
            await api.close()
        await server.close()
        service.close()

"""`leapfrog serve`: the native server and the OpenAI endpoint on one Service, until stopped.

Both front ends (runtime.serving.native_server, runtime.serving.openai_api) share the
Service (runtime.serving.service) that checks, queues and decodes every request; the CLI
(`leapfrog serve`) and the Ray job (runtime.serving.ray_job) call `run_servers`.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

from configs.schema import LeapfrogConfig
from runtime.serving.native_server import NativeServer
from runtime.serving.openai_api import OpenAIApi
from runtime.serving.service import Service
from workers.loading import default_gguf_path


def model_name(checkpoint: str) -> str:
    """The name /v1/models reports: the checkpoint's file or folder name."""
    if checkpoint == "default":
        return default_gguf_path().stem
    return Path(checkpoint).name.removesuffix(".gguf")


async def run_servers(engines: list, config: LeapfrogConfig, ready=None) -> None:
    """Run the native server and (unless http_port is -1) the OpenAI endpoint on `engines`
    until cancelled. `ready((host, port), http_address_or_None)` is called once both listen."""
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

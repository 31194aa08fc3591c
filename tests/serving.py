"""Helpers for the serving tests: a native server on a free loopback port over mock
engines, raw frame I/O, and the health check every fault test ends with."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket

import msgpack
from mock_engine import MockEngine, expected_reply

from configs.schema import LeapfrogConfig, ServerConfig
from runtime.decoding.steps import Step
from runtime.serving.client import Client
from runtime.serving.native_server import NativeServer
from runtime.serving.openai_api import OpenAIApi
from runtime.serving.protocol import HEADER, decode, read_frame
from runtime.serving.service import Service


@contextlib.asynccontextmanager
async def running_server(engines: int = 1, step_delay: float = 0.0, http: bool = False, **server_options):
    """(server, engines) listening on 127.0.0.1:<free port>; with http, the OpenAI
    endpoint too, its (host, port) in server.http_address."""
    config = LeapfrogConfig(server=ServerConfig(host="127.0.0.1", port=0, **server_options))
    config.generation.max_new_tokens = 64
    config.validate()
    mocks = [MockEngine(step_delay=step_delay) for _ in range(engines)]
    service = Service(mocks, config)
    server = NativeServer(service, config.server)
    api = OpenAIApi(service, "mock-model") if http else None
    await server.start()
    if api is not None:
        server.http_address = await api.start("127.0.0.1", 0)
    try:
        yield server, mocks
    finally:
        if api is not None:
            await api.close()
        await server.close()
        service.close()


def frame(payload) -> bytes:
    """A frame around a msgpack value, or around raw bytes (to send broken bodies)."""
    body = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    return HEADER.pack(len(body)) + body


async def connect(server):
    return await asyncio.open_connection(*server.address)


async def receive(reader, timeout: float = 5.0):
    body = await asyncio.wait_for(read_frame(reader, 1 << 24), timeout)
    return None if body is None else decode(body)


async def receive_until_end(reader, timeout: float = 5.0) -> list:
    """Frames up to and including the Stats or Error that ends a request."""
    frames = []
    while True:
        message = await receive(reader, timeout)
        assert message is not None, f"connection closed after {frames}"
        frames.append(message)
        if message.type in ("stats", "error"):
            return frames


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def all_released(server, engines) -> bool:
    service = server.service
    return service.free_engines == len(engines) and service.waiting == 0 and all(e.cache.length == 0 for e in engines)


async def assert_healthy(server, engines) -> None:
    """A normal request still streams exactly the right tokens, and afterwards every
    engine is back in the pool with an empty KV cache."""
    await wait_until(lambda: all_released(server, engines))
    async with Client(*server.address, timeout=10) as client:
        reply = await client.generate("health check", max_new_tokens=64)
    prompt_ids = engines[0].encode_chat("health check")
    assert reply.token_ids == expected_reply(prompt_ids, 64)
    assert reply.stats.finish_reason == "stop"
    await wait_until(lambda: all_released(server, engines))


def request(**fields) -> dict:
    return {"type": "request", "id": 1, "prompt": "hi", **fields}


def as_dict(message) -> dict:
    return dataclasses.asdict(message)


def endless(engine, step_tokens: int = 32_000):
    """Make `engine` decode without end, `step_tokens` per step (until cancelled): a reply
    far larger than any socket buffer, for slow-reader tests."""

    def steps(prompt_ids, mode, max_new_tokens, sampling=None):
        engine.cache.commit(len(prompt_ids))  # held until the service empties it
        engine.started.set()
        while True:
            yield Step([ord("a") + 1] * step_tokens, None, 1)

    engine.steps = steps


async def unread_connection(address, **options):
    """A connection whose client never reads: the smallest receive buffer, set before connecting."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return await asyncio.open_connection(sock=sock, **options)

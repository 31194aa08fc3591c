"""Fair limits on the native server (issue 17): pending work per connection, connections
per peer, an idle clock that only requests reset, allowed modes, a prompt byte limit
before tokenizing, a write timeout for clients that stop reading, one answer per
request id, generic error text, and the API key of the hello frame."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
from mock_engine import expected_reply
from serving import (
    all_released,
    assert_healthy,
    connect,
    endless,
    frame,
    receive,
    receive_until_end,
    request,
    running_server,
    unread_connection,
    wait_until,
)

from runtime.serving.client import Client, ServerError
from runtime.serving.protocol import ErrorCode


def slow_encoder(engine, seconds: float) -> list:
    """Make the engine's chat encoding slow; returns the list its calls are counted in."""
    calls, encode = [], engine.encode_chat

    def slow(prompt):
        calls.append(prompt)
        time.sleep(seconds)
        return encode(prompt)

    engine.encode_chat = slow
    return calls


async def test_a_connection_cannot_queue_unbounded_tokenization():
    async with running_server(max_pending_per_connection=2) as (server, engines):
        calls = slow_encoder(engines[0], 0.05)
        reader, writer = await connect(server)
        for i in range(20):  # a request, then a broken frame that detaches it: repeated
            writer.write(frame(request(id=i, prompt=f"work {i}")) + frame(b"\xc1"))
        codes = []  # per pair: a refusal and the broken frame's error, or (taken) that error alone
        with contextlib.suppress(TimeoutError):
            while True:
                codes.append((await receive(reader, timeout=0.5)).code)
        assert codes.count(ErrorCode.TOO_MANY_PENDING) >= 15 and codes.count(ErrorCode.MALFORMED_FRAME) == 20
        await asyncio.sleep(0.3)
        assert len(calls) <= 4  # 2 pending at a time, not 20 queued
        writer.close()
        await assert_healthy(server, engines)


async def test_cancel_frames_do_not_keep_an_idle_connection_open():
    async with running_server(idle_timeout=0.3) as (server, engines):
        reader, writer = await connect(server)

        async def nag():  # a cancel and a broken frame every 50 ms, until the server hangs up
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(frame({"type": "cancel", "id": 1}) + frame(b"\xc1"))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        nagger = asyncio.create_task(nag())
        start = time.monotonic()
        while (await receive(reader, timeout=3)).code != ErrorCode.IDLE_TIMEOUT:
            pass
        assert time.monotonic() - start < 1.0  # closed after its idle time, cancels or not
        nagger.cancel()
        await wait_until(lambda: not server.connections)
        await assert_healthy(server, engines)


async def test_one_peer_cannot_take_every_connection():
    async with running_server(max_connections=8, max_connections_per_peer=2) as (server, engines):
        held = [await connect(server) for _ in range(2)]
        await wait_until(lambda: len(server.connections) == 2)
        reader, _ = await connect(server)
        error = await receive(reader)
        assert error.code == ErrorCode.TOO_MANY_CONNECTIONS and await receive(reader) is None
        # Another address on the loopback still gets in, and is served.
        reader, writer = await asyncio.open_connection(*server.address, local_addr=("127.0.0.2", 0))
        writer.write(frame(request(id=3, prompt="other peer", max_new_tokens=8)))
        frames = await receive_until_end(reader)
        assert [t for f in frames[:-1] for t in f.token_ids] == expected_reply(engines[0].encode_chat("other peer"), 8)
        writer.close()
        for _, w in held:
            w.close()
        await wait_until(lambda: not server.connections)
        await assert_healthy(server, engines)


@pytest.mark.parametrize("mode, allowed, ok", [
    ("pipeline", [], False), ("async", [], False), ("hf", [], False), ("llama.cpp", [], False),
    ("pld", [], True), ("ht-pld", [], True), ("ar", [], True),
    ("pld", ["ar"], False), ("hf", ["ar", "hf"], True),
])
async def test_modes_a_client_may_pick(mode, allowed, ok):
    async with running_server(allowed_modes=allowed) as (server, engines), Client(*server.address) as client:
        if ok:
            reply = await client.generate("x", mode=mode, max_new_tokens=4)
            assert reply.stats.mode == mode
        else:
            with pytest.raises(ServerError) as e:
                await client.generate("x", mode=mode, max_new_tokens=4)
            assert e.value.code == ErrorCode.MODE_NOT_ALLOWED and not engines[0].calls


@pytest.mark.parametrize("fields", [
    {"prompt": "x" * 101},
    {"prompt": "\u00e9" * 51},  # 102 bytes in UTF-8
    {"prompt": None, "messages": [{"role": "user", "content": "x" * 60}, {"role": "user", "content": "y" * 41}]},
])
async def test_the_prompt_byte_limit_is_checked_before_tokenizing(fields):
    async with running_server(max_prompt_bytes=100) as (server, engines):
        calls = slow_encoder(engines[0], 0)
        reader, writer = await connect(server)
        writer.write(frame(request(**fields)))
        error = await receive(reader)
        assert error.code == ErrorCode.PROMPT_TOO_LONG and "100 bytes" in error.message
        assert not calls
        writer.write(frame(request(id=2, prompt="x" * 100, max_new_tokens=3)))
        assert (await receive_until_end(reader))[-1].type == "stats"
        writer.close()


async def test_the_same_request_id_twice_ends_that_request():
    async with running_server(step_delay=0.02) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(id=1, prompt="first", max_new_tokens=64)))
        assert (await receive(reader)).type == "chunk"
        writer.write(frame(request(id=1, prompt="again")))
        frames = await receive_until_end(reader)
        assert frames[-1].type == "error" and frames[-1].id == 1 and frames[-1].code == ErrorCode.REQUEST_IN_PROGRESS
        assert "request 1 came while request 1 runs" in frames[-1].message  # the running request, named before it ends
        # Its error was its end: nothing more about request 1, and the connection goes on.
        writer.write(frame(request(id=2, prompt="next", max_new_tokens=8)))
        after = await receive_until_end(reader)
        assert {f.id for f in after} == {2} and after[-1].type == "stats"
        await wait_until(lambda: all_released(server, engines))
        assert engines[0].calls[0]["max_new_tokens"] == 64 and engines[0].produced == 8
        writer.close()
        await assert_healthy(server, engines)


async def test_internal_errors_go_to_the_log_not_the_client(caplog):
    async with running_server() as (server, engines):
        def broken(*args, **kwargs):
            raise RuntimeError("secret detail /home/op/model.bin")

        original, engines[0].steps = engines[0].steps, broken
        with caplog.at_level(logging.ERROR):
            reader, writer = await connect(server)
            writer.write(frame(request(id=3)))
            error = await receive(reader)
        assert error.code == ErrorCode.INTERNAL and error.id == 3
        assert "secret" not in error.message and "RuntimeError" not in error.message
        assert "secret detail" in caplog.text
        engines[0].steps = original
        writer.close()
        await assert_healthy(server, engines)


async def test_a_client_that_stops_reading_is_disconnected():
    async with running_server(write_timeout=0.3, idle_timeout=60) as (server, engines):
        endless(engines[0])
        reader, writer = await unread_connection(server.address)
        writer.write(frame(request(prompt="firehose", max_new_tokens=400)))
        await wait_until(lambda: engines[0].started.is_set())
        await wait_until(lambda: all_released(server, engines), timeout=20)  # the socket buffers fill first
        await wait_until(lambda: not server.connections)
        writer.close()


async def test_the_api_key_is_required_in_the_hello_frame():
    async with running_server(api_key="s3cret") as (server, engines):
        for first in ([request()], [{"type": "hello", "api_key": "wrong"}, request()]):
            reader, writer = await connect(server)
            writer.write(b"".join(frame(f) for f in first))
            error = await receive(reader)
            assert error.code == ErrorCode.UNAUTHORIZED and error.id is None and "s3cret" not in error.message
            assert await receive(reader) is None  # closed
        async with Client(*server.address, api_key="s3cret") as client:
            reply = await client.generate("with key", max_new_tokens=64)
        assert reply.token_ids == expected_reply(engines[0].encode_chat("with key"), 64)
        assert not engines[0].calls[1:]

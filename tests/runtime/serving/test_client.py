"""The Python client (runtime.client) against the native server over mock engines:
connection reuse, early close and cancel, timeouts, error codes, the blocking wrapper."""

from __future__ import annotations

import asyncio

import pytest
from mock_engine import expected_reply
from serving import all_released, assert_healthy, running_server, wait_until

from runtime.serving.client import Client, ServerError, SyncClient
from runtime.serving.protocol import ErrorCode


async def test_connection_is_reused():
    async with running_server() as (server, engines), Client(*server.address) as client:
        for _ in range(3):
            await client.generate("a", max_new_tokens=4)
        assert len(server.connections) == 1 and len(client._idle) == 1


async def test_closing_a_stream_early_cancels_it_and_frees_the_engine():
    async with running_server(step_delay=0.02) as (server, engines), Client(*server.address) as client:
        stream = client.stream("long one", max_new_tokens=64)
        async for _ in stream:
            break
        await stream.aclose()
        assert stream.stats is None
        await wait_until(lambda: all_released(server, engines))
        # The decode stopped long before the end of its reply, and the connection is reusable.
        assert engines[0].produced < len(expected_reply(engines[0].encode_chat("long one"), 64)) / 2
        assert len(client._idle) == 1
        reply = await client.generate("again", max_new_tokens=64)
        assert reply.token_ids == expected_reply(engines[0].encode_chat("again"), 64)
        assert len(server.connections) == 1
        await assert_healthy(server, engines)


async def test_a_bare_break_still_cancels_once_the_stream_is_dropped():
    async with running_server(step_delay=0.02) as (server, engines), Client(*server.address) as client:
        async for _ in client.stream("dropped", max_new_tokens=64):
            break  # no aclose(): the event loop finalizes the stream's generator
        await wait_until(lambda: all_released(server, engines))
        assert engines[0].produced < len(expected_reply(engines[0].encode_chat("dropped"), 64)) / 2
        await wait_until(lambda: len(client._idle) == 1)


async def test_client_timeout_and_server_error_codes():
    async with running_server(step_delay=0.5) as (server, engines):
        async with Client(*server.address, timeout=0.1) as client:
            with pytest.raises(TimeoutError):
                await client.generate("slow", max_new_tokens=5)
        async with Client(*server.address) as client:
            with pytest.raises(ServerError) as e:
                await client.generate("x", mode="warp")
        assert e.value.code == ErrorCode.UNKNOWN_MODE and "warp" in e.value.message
        await wait_until(lambda: all_released(server, engines), timeout=10)


async def test_pooled_connection_closed_by_the_server_is_replaced():
    async with running_server(idle_timeout=0.2) as (server, engines), Client(*server.address) as client:
        await client.generate("a", max_new_tokens=3)
        await asyncio.sleep(0.4)  # the server closes the idle pooled connection
        assert len(server.connections) == 0
        reply = await client.generate("b", max_new_tokens=3)
        assert reply.token_ids == expected_reply(engines[0].encode_chat("b"), 3)


async def test_sync_client():
    async with running_server(step_delay=0.01) as (server, engines):
        host, port = server.address

        def use_it():
            with SyncClient(host, port) as client:
                reply = client.generate("sync", max_new_tokens=8)
                with client.stream("sync", max_new_tokens=64) as stream:
                    first = next(iter(stream))
                stream_stats = stream.stats
                full = client.stream("sync", max_new_tokens=8)
                ids = [t for chunk in full for t in chunk.token_ids]
                try:
                    client.generate("x", max_new_tokens=0)
                except ServerError as e:
                    code = e.code
            return reply, first, stream_stats, ids, full.stats, code

        reply, first, stream_stats, ids, stats, code = await asyncio.to_thread(use_it)
        expected = expected_reply(engines[0].encode_chat("sync"), 8)
        assert reply.token_ids == expected and ids == expected and stats.finish_reason == "length"
        assert first.token_ids == expected[:1] and stream_stats is None  # closed early: cancelled
        assert code == ErrorCode.INVALID_MAX_NEW_TOKENS
        await assert_healthy(server, engines)


async def test_timeout_on_a_pooled_connection_closes_it_and_the_server_cancels():
    async with running_server(step_delay=0.3) as (server, engines), Client(*server.address, timeout=5) as client:
        await client.generate("warm", max_new_tokens=1)  # leaves one pooled connection
        pooled = client._idle[0]
        client.timeout = 0.1
        with pytest.raises(TimeoutError):
            await client.generate("slow", max_new_tokens=30)
        assert not client._idle and pooled.writer.is_closing()
        await wait_until(lambda: all_released(server, engines) and not server.connections, timeout=10)
        assert engines[0].produced < 30

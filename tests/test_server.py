"""The native server and the Python client over mock engines: streaming, stats, cancel,
connection reuse, queueing and concurrency."""

from __future__ import annotations

import asyncio

import pytest

from mock_engine import expected_reply, reply_text
from runtime.client import Client, ServerError, SyncClient
from runtime.config import SamplingConfig
from runtime.protocol import Chunk, Error, ErrorCode, Request, Stats, decode, encode
from serving import all_released, assert_healthy, running_server, wait_until


def test_frames_round_trip():
    for message in (
        Request(7, prompt="hé", mode="ht", max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9, seed=1),
        Request(8, messages=[{"role": "user", "content": "x"}]),
        Chunk(7, "é", [1, 2], 1),
        Stats(7, "stop", 3, 4, 2, 2.0, 0.0, 0.1, 0.2, "ar"),
        Error(ErrorCode.UNKNOWN_MODE, "no", None),
    ):
        data = encode(message)
        assert int.from_bytes(data[:4], "big") == len(data) - 4
        assert decode(data[4:]) == message


async def test_stream_chunks_text_and_stats():
    async with running_server() as (server, engines), Client(*server.address) as client:
        stream = client.stream("Hello there", max_new_tokens=64)
        chunks = [chunk async for chunk in stream]
    prompt_ids = engines[0].encode_chat("Hello there")
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == expected_reply(prompt_ids, 64)
    assert "".join(c.text for c in chunks) == reply_text(prompt_ids)
    # One chunk per decoding step, carrying what that step accepted: 1, 2, 3, 1, ...
    assert [len(c.token_ids) for c in chunks[:4]] == [1, 2, 3, 1]
    s = stream.stats
    assert (s.finish_reason, s.tokens, s.prompt_tokens, s.mode) == ("stop", len(ids), len(prompt_ids), "ar")
    assert s.forward_passes == len([c for c in chunks if c.forward_passes])
    assert s.tau == pytest.approx(len(ids) / s.forward_passes) and s.tau > 1.5
    assert 0 <= s.ttft_seconds <= s.seconds


async def test_length_limit_messages_and_options_reach_the_engine():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    async with running_server() as (server, engines), Client(*server.address) as client:
        reply = await client.generate(messages, max_new_tokens=5, mode="pld")
        sampled = await client.generate("x", max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, seed=11)
    prompt_ids = engines[0].encode_chat(messages)
    assert reply.token_ids == expected_reply(prompt_ids, 5) and len(reply.token_ids) == 5
    assert reply.stats.finish_reason == "length"
    assert engines[0].calls[0]["mode"] == "pld" and engines[0].calls[0]["prompt_ids"] == prompt_ids
    assert engines[0].calls[1]["sampling"] == SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, seed=11)
    assert sampled.stats.tokens == 3


async def test_server_defaults_apply_when_a_request_leaves_them_out():
    async with running_server() as (server, engines), Client(*server.address) as client:
        reply = await client.generate("x" * 10)
    assert engines[0].calls[0]["mode"] == "ar" and engines[0].calls[0]["max_new_tokens"] == 64
    assert reply.stats.tokens == len(expected_reply(engines[0].encode_chat("x" * 10), 64))


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


async def test_cancel_while_queued():
    async with running_server(step_delay=0.05) as (server, engines), Client(*server.address) as client:
        running = asyncio.create_task(client.generate("first", max_new_tokens=20))
        await wait_until(lambda: server.service.free_engines == 0)
        queued = client.stream("second", max_new_tokens=20)
        waiter = asyncio.create_task(queued.__anext__())
        await wait_until(lambda: server.service.waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await queued.aclose()
        await wait_until(lambda: server.service.waiting == 0)
        assert len(engines[0].calls) == 1  # the queued request never reached the engine
        assert (await running).stats.finish_reason == "length"
        await assert_healthy(server, engines)


async def test_queue_then_overloaded_beyond_it():
    async with running_server(step_delay=0.02, max_queue=1) as (server, engines), Client(*server.address) as client:
        first = asyncio.create_task(client.generate("one", max_new_tokens=10))
        await wait_until(lambda: server.service.free_engines == 0)
        second = asyncio.create_task(client.generate("two", max_new_tokens=10))
        await wait_until(lambda: server.service.waiting == 1)
        with pytest.raises(ServerError) as e:
            await client.generate("three", max_new_tokens=10)
        assert e.value.code == ErrorCode.OVERLOADED
        a, b = await first, await second
        assert a.token_ids == expected_reply(engines[0].encode_chat("one"), 10)
        assert b.token_ids == expected_reply(engines[0].encode_chat("two"), 10)
        assert b.stats.queue_seconds > 0.05  # it waited for the first one
        await assert_healthy(server, engines)


async def test_concurrency_two_engines_decode_at_once():
    async with running_server(engines=2, step_delay=0.02) as (server, engines), Client(*server.address) as client:
        replies = await asyncio.gather(*(client.generate(f"p{i}", max_new_tokens=12) for i in range(4)))
        for i, reply in enumerate(replies):
            assert reply.token_ids == expected_reply(engines[0].encode_chat(f"p{i}"), 12)
        assert all(e.calls for e in engines)  # both engines took requests
        assert len(server.connections) == 4 or len(client._idle) >= 2
        await assert_healthy(server, engines)


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

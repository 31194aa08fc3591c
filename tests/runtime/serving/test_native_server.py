"""The native server and the Python client over mock engines: streaming, stats, cancel,
connection reuse, queueing and concurrency."""

from __future__ import annotations

import asyncio

import pytest
from mock_engine import expected_reply, reply_text
from serving import assert_healthy, running_server, wait_until

from configs.schema import SamplingConfig
from runtime.serving.client import Client, ServerError
from runtime.serving.protocol import Chunk, Error, ErrorCode, Request, Stats, decode, encode


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
    assert (s.finish_reason, s.tokens, s.prompt_tokens, s.mode) == ("stop", len(ids), len(prompt_ids), "ht")  # the default
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
    assert engines[0].calls[0]["mode"] == "ht" and engines[0].calls[0]["max_new_tokens"] == 64  # [generation] mode
    assert reply.stats.tokens == len(expected_reply(engines[0].encode_chat("x" * 10), 64))


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
        running = asyncio.gather(*(client.generate(f"p{i}", max_new_tokens=12) for i in range(4)))
        await wait_until(lambda: server.service.free_engines == 0 and server.service.waiting == 2)
        for i, reply in enumerate(await running):
            assert reply.token_ids == expected_reply(engines[0].encode_chat(f"p{i}"), 12)
        assert all(len(e.calls) >= 1 for e in engines) and sum(len(e.calls) for e in engines) == 4
        await assert_healthy(server, engines)


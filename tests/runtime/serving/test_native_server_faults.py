"""Bad input and faults: each gets a clear error, and afterwards a normal request still
streams the right tokens and no engine or KV cache space is left held (assert_healthy)."""

from __future__ import annotations

import msgpack
import pytest
from mock_engine import expected_reply
from serving import (
    all_released,
    assert_healthy,
    connect,
    frame,
    receive,
    receive_until_end,
    request,
    running_server,
    wait_until,
)

from runtime.serving.protocol import HEADER, ErrorCode

BAD_FRAMES = {
    "malformed msgpack": (b"\xc1", ErrorCode.MALFORMED_FRAME),
    "empty frame": (b"", ErrorCode.MALFORMED_FRAME),
    "nesting bomb": (b"\x91" * 100_000 + b"\x00", ErrorCode.MALFORMED_FRAME),
    "array length past the frame": (b"\xdd\xff\xff\xff\xff", ErrorCode.MALFORMED_FRAME),
    "truncated msgpack": (msgpack.packb({"type": "request", "id": 1})[:-3], ErrorCode.MALFORMED_FRAME),
    "trailing bytes": (msgpack.packb(request()) + b"\x00", ErrorCode.MALFORMED_FRAME),
    "not a map": ([1, 2, 3], ErrorCode.MALFORMED_FRAME),
    "no type": ({"id": 1, "prompt": "hi"}, ErrorCode.MALFORMED_FRAME),
    "server frame type": ({"type": "error", "code": "x", "message": "y"}, ErrorCode.MALFORMED_FRAME),
    "invalid utf-8 prompt": (msgpack.packb({"type": "request", "id": 1, "prompt": b"\xff\xfe"}, use_bin_type=False), ErrorCode.INVALID_UTF8),
    "invalid utf-8 key": (msgpack.packb({b"\xff": 1}, use_bin_type=False), ErrorCode.INVALID_UTF8),
    "prompt as int": (request(prompt=5), ErrorCode.INVALID_FIELD),
    "prompt as bytes": (request(prompt=b"hi"), ErrorCode.INVALID_FIELD),
    "id as str": (request(id="1"), ErrorCode.INVALID_FIELD),
    "missing id": ({"type": "request", "prompt": "hi"}, ErrorCode.INVALID_FIELD),
    "max_new_tokens as str": (request(max_new_tokens="3"), ErrorCode.INVALID_FIELD),
    "max_new_tokens as float": (request(max_new_tokens=3.0), ErrorCode.INVALID_FIELD),
    "temperature as bool": (request(temperature=True), ErrorCode.INVALID_FIELD),
    "messages not a list": (request(prompt=None, messages="hi"), ErrorCode.INVALID_FIELD),
    "message without content": (request(prompt=None, messages=[{"role": "user"}]), ErrorCode.INVALID_FIELD),
    "message with int role": (request(prompt=None, messages=[{"role": 1, "content": "x"}]), ErrorCode.INVALID_FIELD),
    "unknown field": (request(best_of=3), ErrorCode.INVALID_FIELD),
    "message with an unknown role": (request(prompt=None, messages=[{"role": "wizard", "content": "x"}]), ErrorCode.INVALID_FIELD),
    "temperature NaN": (request(temperature=float("nan")), ErrorCode.INVALID_FIELD),
    "top_p infinite": (request(top_p=float("inf")), ErrorCode.INVALID_FIELD),
    "seed beyond 64 bits signed": (request(seed=2**64 - 1), ErrorCode.INVALID_FIELD),
    "mode pipeline (not offered)": (request(mode="pipeline"), ErrorCode.MODE_NOT_ALLOWED),
    "integer map key": ({1: 2}, ErrorCode.MALFORMED_FRAME),
    "prompt and messages": (request(messages=[{"role": "user", "content": "x"}]), ErrorCode.INVALID_FIELD),
    "neither prompt nor messages": (request(prompt=None), ErrorCode.INVALID_FIELD),
    "empty prompt": (request(prompt=""), ErrorCode.INVALID_FIELD),
    "unknown mode": (request(mode="warp"), ErrorCode.UNKNOWN_MODE),
    "max_new_tokens 0": (request(max_new_tokens=0), ErrorCode.INVALID_MAX_NEW_TOKENS),
    "max_new_tokens -5": (request(max_new_tokens=-5), ErrorCode.INVALID_MAX_NEW_TOKENS),
    "max_new_tokens over the limit": (request(max_new_tokens=101), ErrorCode.INVALID_MAX_NEW_TOKENS),
    "negative temperature": (request(temperature=-1.0), ErrorCode.INVALID_SAMPLING),
    "top_p 0": (request(top_p=0.0), ErrorCode.INVALID_SAMPLING),
    "prompt longer than the context": (request(prompt="x" * 600), ErrorCode.PROMPT_TOO_LONG),
    "prompt + max_new_tokens over the context": (request(prompt="x" * 450, max_new_tokens=100), ErrorCode.PROMPT_TOO_LONG),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_bad_frame_gets_an_error_and_the_connection_goes_on(name):
    payload, code = BAD_FRAMES[name]
    async with running_server(max_new_tokens=100) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(payload))
        error = await receive(reader)
        assert error.type == "error" and error.code == code, error
        assert error.message
        # The same connection still serves a good request.
        writer.write(frame(request(id=2, prompt="after", max_new_tokens=100)))
        frames = await receive_until_end(reader)
        assert frames[-1].type == "stats" and frames[-1].id == 2
        assert [t for f in frames[:-1] for t in f.token_ids] == expected_reply(engines[0].encode_chat("after"), 100)
        writer.close()
        await assert_healthy(server, engines)


async def test_request_errors_carry_the_request_id():
    async with running_server() as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(id=41, mode="warp")))
        assert (await receive(reader)).id == 41
        writer.write(frame(request(id=42, prompt=7)))
        assert (await receive(reader)).id == 42
        writer.close()


async def test_frame_over_the_size_limit_closes_only_that_connection():
    async with running_server(max_frame_bytes=4096) as (server, engines):
        reader, writer = await connect(server)
        writer.write(HEADER.pack(4097))  # the body is never sent, nor read
        error = await receive(reader)
        assert error.code == ErrorCode.FRAME_TOO_LARGE and "4096" in error.message
        assert await receive(reader) is None  # closed
        # A frame of exactly the limit is read and parsed (its prompt is then too long
        # for the mock's 512-token context, which proves the body was understood).
        at_limit = next(f for n in range(3900, 4096) if len(f := frame(request(prompt="y" * n, max_new_tokens=2))) == 4 + 4096)
        reader, writer = await connect(server)
        writer.write(at_limit)
        assert (await receive(reader)).code == ErrorCode.PROMPT_TOO_LONG
        writer.close()
        await assert_healthy(server, engines)


async def test_second_request_on_a_busy_connection_is_refused_and_the_first_goes_on():
    async with running_server(step_delay=0.02) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(id=1, prompt="first", max_new_tokens=20)))
        writer.write(frame(request(id=2, prompt="second")))
        frames = await receive_until_end(reader)  # the refusal comes among the first request's chunks
        assert frames[-1].type == "error" and frames[-1].code == ErrorCode.REQUEST_IN_PROGRESS and frames[-1].id == 2
        rest = await receive_until_end(reader)
        assert rest[-1].type == "stats" and rest[-1].id == 1
        ids = [t for f in frames[:-1] + rest[:-1] for t in f.token_ids]
        assert ids == expected_reply(engines[0].encode_chat("first"), 20)
        writer.close()
        await assert_healthy(server, engines)


async def test_cancel_frame_stops_the_request():
    async with running_server(step_delay=0.02) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(id=5, prompt="cancel me", max_new_tokens=64)))
        first = await receive(reader)
        assert first.type == "chunk"
        writer.write(frame({"type": "cancel", "id": 99}))  # another id: ignored
        writer.write(frame({"type": "cancel", "id": 5}))
        frames = await receive_until_end(reader)
        stats = frames[-1]
        assert stats.type == "stats" and stats.finish_reason == "cancelled" and stats.tokens < 20
        writer.close()
        await assert_healthy(server, engines)


async def test_client_disconnecting_mid_stream_frees_the_engine_and_cache():
    async with running_server(step_delay=0.02) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(prompt="bye", max_new_tokens=64)))
        assert (await receive(reader)).type == "chunk"
        assert engines[0].cache.length > 0
        writer.close()
        await wait_until(lambda: all_released(server, engines))
        assert engines[0].produced < 20  # decoding stopped, it did not run to the end
        await assert_healthy(server, engines)


async def test_client_disconnecting_while_queued():
    async with running_server(step_delay=0.05) as (server, engines):
        r1, w1 = await connect(server)
        w1.write(frame(request(id=1, prompt="runs", max_new_tokens=10)))
        await wait_until(lambda: server.service.free_engines == 0)
        r2, w2 = await connect(server)
        w2.write(frame(request(id=1, prompt="waits", max_new_tokens=10)))
        await wait_until(lambda: server.service.waiting == 1)
        w2.close()
        await wait_until(lambda: server.service.waiting == 0)
        assert (await receive_until_end(r1))[-1].finish_reason == "length"
        assert len(engines[0].calls) == 1
        w1.close()
        await assert_healthy(server, engines)


@pytest.mark.parametrize("partial", [b"", b"\x00\x00", HEADER.pack(100) + b"abc"])
async def test_idle_and_half_open_connections_are_closed(partial):
    async with running_server(idle_timeout=0.3) as (server, engines):
        reader, writer = await connect(server)
        writer.write(partial)
        error = await receive(reader, timeout=3)
        assert error.code == ErrorCode.IDLE_TIMEOUT
        assert await receive(reader, timeout=3) is None  # closed
        await wait_until(lambda: not server.connections)
        await assert_healthy(server, engines)


async def test_long_request_is_not_an_idle_connection():
    async with running_server(idle_timeout=0.2, step_delay=0.03) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(prompt="slow but busy", max_new_tokens=20)))
        frames = await receive_until_end(reader)  # takes ~0.3 s: longer than the idle timeout
        assert frames[-1].type == "stats" and frames[-1].tokens == 20
        writer.close()


async def test_flood_of_connections_over_the_limit():
    async with running_server(max_connections=4) as (server, engines):
        held = [await connect(server) for _ in range(4)]
        await wait_until(lambda: len(server.connections) == 4)
        for _ in range(10):
            reader, writer = await connect(server)
            error = await receive(reader)
            assert error.code == ErrorCode.TOO_MANY_CONNECTIONS
            assert await receive(reader) is None
        # The admitted ones still work, all at once.
        for i, (reader, writer) in enumerate(held):
            writer.write(frame(request(id=i, prompt=f"held {i}", max_new_tokens=8)))
        for i, (reader, writer) in enumerate(held):
            frames = await receive_until_end(reader)
            assert [t for f in frames[:-1] for t in f.token_ids] == expected_reply(engines[0].encode_chat(f"held {i}"), 8)
            writer.close()
        await wait_until(lambda: not server.connections)
        await assert_healthy(server, engines)


async def test_engine_failure_is_an_internal_error_and_the_server_goes_on():
    async with running_server() as (server, engines):
        original = engines[0].steps

        def broken(*args, **kwargs):
            steps = original(*args, **kwargs)
            next(steps)
            raise RuntimeError("device lost")

        engines[0].steps = broken
        reader, writer = await connect(server)
        writer.write(frame(request(id=3)))
        error = await receive(reader)
        assert error.code == ErrorCode.INTERNAL and error.id == 3 and "device lost" not in error.message  # it is in the log
        engines[0].steps = original
        writer.close()
        await assert_healthy(server, engines)


async def test_broken_frame_mid_stream_ends_that_request_and_the_connection_goes_on():
    async with running_server(step_delay=0.02) as (server, engines):
        reader, writer = await connect(server)
        writer.write(frame(request(id=1, prompt="interrupted", max_new_tokens=64)))
        assert (await receive(reader)).type == "chunk"
        writer.write(frame(b"\xc1"))
        frames = await receive_until_end(reader)
        assert frames[-1].type == "error" and frames[-1].id == 1 and frames[-1].code == ErrorCode.MALFORMED_FRAME
        # The next request is accepted right away; stray frames of request 1 may come first.
        writer.write(frame(request(id=2, prompt="next", max_new_tokens=64)))
        mine = []
        while not mine or mine[-1].type == "chunk":
            message = await receive(reader)
            if message.id == 2:
                mine.append(message)
        assert mine[-1].type == "stats"
        assert [t for m in mine[:-1] for t in m.token_ids] == expected_reply(engines[0].encode_chat("next"), 64)
        assert engines[0].calls[0]["max_new_tokens"] == 64 and len(engines[0].calls) == 2
        writer.close()
        await assert_healthy(server, engines)

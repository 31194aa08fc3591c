"""Property-based fuzzing of both protocols (issue 17): random frames, and requests built
from the schema then mutated (a field dropped, retyped, given a random value, an unknown
one added), over the native protocol and as JSON bodies over HTTP. Whatever comes, the
server answers with typed errors (no internal_error, no 5xx, no crash), leaves no engine
or KV cache space held, and afterwards serves an exact normal reply. Bounded for `make
test`: a few dozen examples each, mock engines."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mock_engine import reply_text
from serving import all_released, assert_healthy, frame, running_server, wait_until

from runtime.modes import MODES
from runtime.serving.protocol import ErrorCode, decode, read_frame

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()} - {ErrorCode.INTERNAL}

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
           | st.binary(max_size=10) | st.sampled_from(["", "user", "ar", "pld", "pipeline", "\ud800", "x" * 300]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=8)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "wizard"]),
                                           "content": st.text(max_size=30)}), max_size=3)
REQUEST = {
    "prompt": st.text(max_size=40), "messages": messages, "mode": st.sampled_from([*MODES, "warp"]),
    "max_new_tokens": st.integers(-3, 120), "temperature": st.floats(-1, 200) | st.sampled_from([1e-40, 0.0]),
    "top_k": st.integers(-2, 50), "top_p": st.floats(-0.5, 1.5), "seed": st.integers(-1, 2**64 - 1),
}


@st.composite
def mutated_request(draw) -> dict:
    fields = draw(st.dictionaries(st.sampled_from(sorted(REQUEST)), st.just(None), max_size=5))
    request = {"type": "request", "id": draw(st.integers(0, 50)), **{k: draw(REQUEST[k]) for k in fields}}
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["drop", "retype", "add"]))
        key = draw(st.sampled_from(sorted(request)))
        if action == "drop":
            request.pop(key)
        elif action == "retype":
            request[key] = draw(values)
        else:
            request[draw(st.text(max_size=8))] = draw(values)
    return request


def packed(value) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):  # surrogates, too-large ints: send them as broken bytes
        return b"\xc1"


native_frames = st.lists(
    st.one_of(mutated_request().map(packed), values.map(packed), st.binary(max_size=40),
              st.sampled_from([packed({"type": "cancel", "id": 1}), packed({"type": "hello", "api_key": "k"})])),
    min_size=1, max_size=5,
)


async def native_example(bodies: list[bytes]) -> None:
    async with running_server(max_new_tokens=100) as (server, engines):
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"".join(frame(b) for b in bodies) + frame({"type": "request", "id": 999, "prompt": "last"}))
        while True:  # until the final request's end, or the server closing the connection
            try:
                body = await asyncio.wait_for(read_frame(reader, 1 << 24), 10)
            except (ConnectionError, asyncio.IncompleteReadError):
                break
            if body is None:
                break
            message = decode(body)  # every server frame is a valid message
            assert message.type != "error" or message.code in CODES, message
            if message.type in ("stats", "error") and message.id == 999:
                break
        writer.close()
        await wait_until(lambda: all_released(server, engines))
        await assert_healthy(server, engines)


@FUZZ
@given(native_frames)
def test_native_protocol_survives_random_frames(bodies):
    asyncio.run(native_example(bodies))


json_bodies = st.one_of(
    mutated_request().map(lambda r: {k: v for k, v in r.items() if k not in ("type", "id")}),
    st.fixed_dictionaries({"model": st.just("m"), "messages": messages},
                          optional={"stream": values, "stream_options": values, "stop": values, "n": values,
                                    "max_tokens": values, "logit_bias": values, "temperature": values}),
    values,
)


def http_body(value) -> bytes:
    with contextlib.suppress(UnicodeEncodeError, ValueError, TypeError):
        return json.dumps(value, default=lambda b: b.hex()).encode("utf-8", "surrogatepass")
    return b"\xff"


async def http_example(bodies: list[tuple[bytes, str, str]]) -> None:
    async with running_server(http=True, max_new_tokens=100) as (server, engines):
        host, port = server.http_address
        async with aiohttp.ClientSession() as http:
            for body, content_type, path in bodies:
                async with http.post(f"http://{host}:{port}{path}", data=body, headers={"Content-Type": content_type}) as r:
                    payload = await r.read()
                    assert r.status < 500, payload
                    if r.status >= 400:
                        error = json.loads(payload)["error"]
                        assert set(error) == {"message", "type", "param", "code"} and error["code"] in CODES
            async with http.post(f"http://{host}:{port}/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": "last"}], "max_tokens": 64}) as r:
                reply = await r.json()
        assert reply["choices"][0]["message"]["content"] == reply_text(engines[0].encode_chat([{"role": "user", "content": "last"}]))
        await wait_until(lambda: all_released(server, engines))
        await assert_healthy(server, engines)


http_requests = st.lists(st.tuples(
    json_bodies.map(http_body) | st.binary(max_size=30),
    st.sampled_from(["application/json", "application/json; charset=utf-8", "application/json; charset=bogus", "text/plain", ""]),
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v2/x"]),
), min_size=1, max_size=4)


@FUZZ
@given(http_requests)
def test_openai_endpoint_survives_random_bodies(bodies):
    asyncio.run(http_example(bodies))

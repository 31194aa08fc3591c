"""The OpenAI-compatible endpoint, driven by the official `openai` package over mock engines."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from mock_engine import expected_reply, reply_text
from serving import all_released, assert_healthy, running_server, wait_until

from configs.schema import SamplingConfig
from runtime.serving.protocol import ErrorCode

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def client_for(server) -> openai.AsyncOpenAI:
    host, port = server.http_address
    return openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=10)


def reply_for(engines, messages, max_new: int) -> str:
    ids = expected_reply(engines[0].encode_chat(messages), max_new)
    return engines[0].tokenizer.decode(ids)


async def test_models():
    async with running_server(http=True) as (server, engines):
        models = await client_for(server).models.list()
    assert [m.id for m in models.data] == ["mock-model"]


async def test_chat_completion():
    async with running_server(http=True) as (server, engines):
        out = await client_for(server).chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=64)
    assert out.choices[0].message.content == reply_text(engines[0].encode_chat(MESSAGES))
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.role == "assistant"
    prompt_ids = engines[0].encode_chat(MESSAGES)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(expected_reply(prompt_ids, 64))
    assert out.model_extra["leapfrog"]["tau"] > 1


async def test_chat_completion_streams_deltas_and_usage():
    async with running_server(http=True, step_delay=0.005) as (server, engines):
        stream = await client_for(server).chat.completions.create(
            model="mock-model", messages=MESSAGES, max_tokens=10, stream=True, stream_options={"include_usage": True},
        )
        events = [event async for event in stream]
    deltas = [e.choices[0].delta.content or "" for e in events if e.choices]
    assert events[0].choices[0].delta.role == "assistant"
    assert len([d for d in deltas if d]) > 3  # streamed in pieces, not at once
    assert "".join(deltas) == reply_for(engines, MESSAGES, 10)
    finishes = [e.choices[0].finish_reason for e in events if e.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert events[-1].usage.completion_tokens == 10


async def test_completions_use_the_raw_prompt_and_pass_options():
    async with running_server(http=True) as (server, engines):
        client = client_for(server)
        out = await client.completions.create(
            model="m", prompt="Once upon", max_tokens=7, temperature=0.5, top_p=0.8, seed=3,
            extra_body={"mode": "pld", "top_k": 4},
        )
        stream = await client.completions.create(model="m", prompt="Once upon", max_tokens=7, stream=True)
        streamed = "".join([e.choices[0].text async for e in stream])
    raw_ids = engines[0].tokenizer.encode("Once upon")  # no chat template
    assert engines[0].calls[0]["prompt_ids"] == raw_ids and engines[0].calls[0]["mode"] == "pld"
    assert engines[0].calls[0]["sampling"] == SamplingConfig(temperature=0.5, top_k=4, top_p=0.8, seed=3)
    expected = engines[0].tokenizer.decode(expected_reply(raw_ids, 7))
    assert out.choices[0].text == expected == streamed
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "options, code",
    [
        ({"max_tokens": 0}, ErrorCode.INVALID_MAX_NEW_TOKENS),
        ({"max_tokens": 10**6}, ErrorCode.INVALID_MAX_NEW_TOKENS),
        ({"temperature": -1}, ErrorCode.INVALID_SAMPLING),
        ({"extra_body": {"mode": "warp"}}, ErrorCode.UNKNOWN_MODE),
        ({"n": 2}, ErrorCode.INVALID_FIELD),
        ({"extra_body": {"frobnicate": 1}}, ErrorCode.INVALID_FIELD),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, ErrorCode.PROMPT_TOO_LONG),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, ErrorCode.INVALID_FIELD),
        ({"messages": "hello"}, ErrorCode.INVALID_FIELD),
    ],
)
async def test_bad_requests_get_openai_errors(options, code):
    options = {"model": "m", "messages": MESSAGES, **options}
    async with running_server(http=True) as (server, engines):
        with pytest.raises(openai.BadRequestError) as e:
            await client_for(server).chat.completions.create(**options)
        assert e.value.code == code and e.value.status_code == 400
        await assert_healthy(server, engines)


async def test_malformed_json_body():
    async with running_server(http=True) as (server, engines):
        host, port = server.http_address
        reader, writer = await asyncio.open_connection(host, port)
        body = b'{"messages": [}'
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        response = await reader.read()
        writer.close()
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        assert json.loads(payload)["error"]["code"] == ErrorCode.MALFORMED_FRAME
        await assert_healthy(server, engines)


async def test_overloaded_is_429():
    async with running_server(http=True, step_delay=0.05, max_queue=0) as (server, engines):
        client = client_for(server)
        first = asyncio.create_task(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8))
        await wait_until(lambda: server.service.free_engines == 0)
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8)
        assert e.value.code == ErrorCode.OVERLOADED
        assert (await first).choices[0].message.content == reply_for(engines, MESSAGES, 8)
        await assert_healthy(server, engines)


async def test_client_leaving_a_stream_cancels_the_request():
    async with running_server(http=True, step_delay=0.03) as (server, engines):
        client = client_for(server)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=64, stream=True)
        async for _ in stream:
            break
        await stream.close()
        await wait_until(lambda: all_released(server, engines))
        assert engines[0].produced < 20
        await assert_healthy(server, engines)


async def test_client_hanging_up_on_a_whole_reply_cancels_it():
    async with running_server(http=True, step_delay=0.03) as (server, engines):
        host, port = server.http_address
        impatient = openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0, timeout=0.2)
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(model="m", messages=MESSAGES, max_tokens=64)
        await wait_until(lambda: all_released(server, engines))
        assert engines[0].produced < 20  # stopped soon after the hang-up, not at the end of the reply
        await assert_healthy(server, engines)

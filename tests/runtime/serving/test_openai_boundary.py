"""The OpenAI endpoint at its boundary (issue 17): every malformed request gets a typed
4xx in OpenAI's error shape, never a 500; harmless forms of OpenAI clients work; stop
sequences and usage work as in the OpenAI API; the API key; the HTTP limits."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from mock_engine import expected_reply, reply_text
from serving import all_released, assert_healthy, endless, running_server, unread_connection, wait_until

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
CHAT = {"model": "m", "messages": MESSAGES, "max_tokens": 64}


async def post(server, body: bytes | dict, content_type: str = "application/json", path: str = "/v1/chat/completions",
               headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.http_address
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{host}:{port}{path}", data=data,
                             headers={"Content-Type": content_type, **(headers or {})}) as response:
            return response.status, await response.json(content_type=None)


def client_for(server, api_key: str = "unused") -> openai.AsyncOpenAI:
    host, port = server.http_address
    return openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key=api_key, max_retries=0, timeout=10)


BAD_BODIES = {
    "bogus charset": (json.dumps(CHAT).encode(), "application/json; charset=bogus", 400),
    "5000-digit max_tokens": (b'{"model": "m", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400),
    "100,000 [": (b"[" * 100_000, "application/json", 400),
    "400-digit temperature": (json.dumps({**CHAT, "temperature": 10**399}).encode(), "application/json", 400),
    "stream_options a string": (json.dumps({**CHAT, "stream": True, "stream_options": "x"}).encode(), "application/json", 400),
    "text/plain": (json.dumps(CHAT).encode(), "text/plain", 415),
    "no content type": (json.dumps(CHAT).encode(), "", 415),
    "role wizard": (json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}).encode(), "application/json", 400),
    "NaN temperature": (json.dumps(CHAT)[:-1].encode() + b', "temperature": NaN}', "application/json", 400),
    "1e999 top_p": (json.dumps(CHAT)[:-1].encode() + b', "top_p": 1e999}', "application/json", 400),
    "lone surrogate": (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "application/json", 400),
    "invalid utf-8": (b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}', "application/json", 400),
    "seed 2**64": (json.dumps({**CHAT, "seed": 2**64}).encode(), "application/json", 400),
    "stream a string": (json.dumps({**CHAT, "stream": "yes"}).encode(), "application/json", 400),
    "stop of 5": (json.dumps({**CHAT, "stop": ["a", "b", "c", "d", "e"]}).encode(), "application/json", 400),
    "stop an int": (json.dumps({**CHAT, "stop": 3}).encode(), "application/json", 400),
    "n 2": (json.dumps({**CHAT, "n": 2}).encode(), "application/json", 400),
    "logit_bias set": (json.dumps({**CHAT, "logit_bias": {"5": 1}}).encode(), "application/json", 400),
    "model an int": (json.dumps({**CHAT, "model": 5}).encode(), "application/json", 400),
    "mode pipeline": (json.dumps({**CHAT, "mode": "pipeline"}).encode(), "application/json", 422),
    "body too large": (b'{"pad": "' + b"x" * 300_000 + b'"}', "application/json", 413),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
async def test_malformed_requests_get_a_typed_4xx(name):
    body, content_type, status = BAD_BODIES[name]
    async with running_server(http=True, max_frame_bytes=200_000) as (server, engines):
        got, payload = await post(server, body, content_type)
        assert got == status, payload
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"] == "invalid_request_error"
        await assert_healthy(server, engines)


@pytest.mark.parametrize("limits", [{"max_tokens": 3, "max_completion_tokens": 10}, {"max_completion_tokens": 10, "max_tokens": 3}])
async def test_conflicting_token_limits_are_refused_naming_both(limits):
    body = {"model": "m", "messages": MESSAGES, **limits}
    async with running_server(http=True) as (server, engines):
        status, payload = await post(server, body)
        assert status == 400 and payload["error"]["code"] == "invalid_field", payload
        assert "max_tokens" in payload["error"]["message"] and "max_completion_tokens" in payload["error"]["message"]
        assert not engines[0].calls
        # The same value twice is no conflict.
        status, payload = await post(server, {**body, "max_tokens": 3, "max_completion_tokens": 3})
        assert status == 200 and payload["usage"]["completion_tokens"] == 3, payload


async def test_unknown_paths_are_404_in_openai_shape():
    async with running_server(http=True) as (server, engines):
        status, payload = await post(server, CHAT, path="/v1/embeddings")
    assert status == 404 and payload["error"]["code"] == "not_found"


@pytest.mark.parametrize("harmless", [{"n": None}, {"n": 1}, {"stop": ""}, {"stop": None}, {"stop": []}, {"logit_bias": {}},
                                      {"logit_bias": None}, {"stream_options": None}, {"logprobs": False}, {"tools": []},
                                      {"user": "u1"}, {"frequency_penalty": 0}, {"presence_penalty": 0.0}])
async def test_harmless_forms_of_openai_clients_work(harmless):
    async with running_server(http=True) as (server, engines):
        status, payload = await post(server, {**CHAT, **harmless})
    assert status == 200, payload
    assert payload["choices"][0]["message"]["content"] == reply_text(engines[0].encode_chat(MESSAGES))


async def test_stop_sequences_cut_the_reply_and_stop_the_decode():
    async with running_server(http=True, step_delay=0.01) as (server, engines):
        full = reply_text(engines[0].encode_chat(MESSAGES))  # "Reply to N tokens, sum S \u00e9\u00e8 ok."
        client = client_for(server)
        out = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=64, stop=[" sum", "zzz"])
        assert out.choices[0].message.content == full[: full.index(" sum")]
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens < len(full) and engines[0].produced < len(full)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=64, stop="tokens",
                                                      stream=True, stream_options={"include_usage": True})
        events = [e async for e in stream]
        text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
        assert text == full[: full.index("tokens")]
        assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "stop"
        assert events[-1].choices == [] and 0 < events[-1].usage.completion_tokens < len(full)
        completion = await client.completions.create(model="m", prompt="Once", max_tokens=64, stop=["\u00e8"])
        raw = engines[0].tokenizer.decode(expected_reply(engines[0].tokenizer.encode("Once"), 64))
        assert completion.choices[0].text == raw[: raw.index("\u00e8")]
        await assert_healthy(server, engines)


async def test_usage_in_whole_and_streamed_replies():
    async with running_server(http=True) as (server, engines):
        client = client_for(server)
        prompt_ids = engines[0].encode_chat(MESSAGES)
        out = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=7)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=7, stream=True)
        events = [e async for e in stream]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(prompt_ids), 7, len(prompt_ids) + 7)
    assert all(e.usage is None for e in events) and events[-1].choices[0].finish_reason == "length"


async def test_the_api_key_is_required_as_a_bearer_token():
    async with running_server(http=True, api_key="s3cret") as (server, engines):
        for key in ("wrong", "s3cret-not"):
            with pytest.raises(openai.AuthenticationError) as e:
                await client_for(server, key).chat.completions.create(**CHAT)
            assert e.value.status_code == 401 and "s3cret" not in str(e.value)
        with pytest.raises(openai.AuthenticationError):
            await client_for(server, "wrong").models.list()
        status, _ = await post(server, CHAT)  # no Authorization header at all
        assert status == 401 and not engines[0].calls
        out = await client_for(server, "s3cret").chat.completions.create(**CHAT)
    assert out.choices[0].message.content == reply_text(engines[0].encode_chat(MESSAGES))


async def test_http_connections_are_capped():
    async with running_server(http=True, max_http_connections=2) as (server, engines):
        held = [await asyncio.open_connection(*server.http_address) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection(*server.http_address)
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 429") and b"too_many_connections" in answer
        for _, w in held:
            w.close()
        await asyncio.sleep(0.05)
        out = await client_for(server).chat.completions.create(**CHAT)
        assert out.choices[0].message.content == reply_text(engines[0].encode_chat(MESSAGES))


async def test_a_stream_nobody_reads_is_cut_after_the_write_timeout():
    async with running_server(http=True, write_timeout=0.3) as (server, engines):
        endless(engines[0])
        reader, writer = await unread_connection(server.http_address)
        body = json.dumps({**CHAT, "max_tokens": 400, "stream": True}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await wait_until(lambda: engines[0].started.is_set())
        await wait_until(lambda: all_released(server, engines), timeout=20)  # the socket buffers fill first
        writer.close()

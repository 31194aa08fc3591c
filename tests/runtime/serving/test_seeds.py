"""Sampling that varies unless seeded (issue 40): a request that sends no seed samples with
a fresh one and reports it (the native stats frame; the OpenAI reply's `leapfrog.seed`
and `system_fingerprint`), so that sending it back reproduces the reply; a request with
a seed keeps it. `[server] fresh_seed = false` restores the [sampling] seed for all.
The real model's check (same reported seed, same tokens in every mode) is in
test_servers.py."""

from __future__ import annotations

import openai
from serving import running_server

from configs.schema import SamplingConfig
from runtime.serving.client import Client

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def seeds_used(engine) -> list[int]:
    return [call["sampling"].seed for call in engine.calls]


async def test_unseeded_requests_get_fresh_seeds_and_report_them():
    async with running_server() as (server, engines), Client(*server.address) as client:
        first = await client.generate(MESSAGES, max_new_tokens=8, temperature=0.7)
        second = await client.generate(MESSAGES, max_new_tokens=8, temperature=0.7)
        again = await client.generate(MESSAGES, max_new_tokens=8, temperature=0.7, seed=first.stats.seed)
    used = seeds_used(engines[0])
    assert used[0] != used[1]  # fresh entropy each time (2**53 values: a clash is not a real risk)
    assert [first.stats.seed, second.stats.seed, again.stats.seed] == used == [used[0], used[1], used[0]]
    assert engines[0].calls[2]["sampling"] == engines[0].calls[0]["sampling"]  # the reported seed reproduces it
    assert all(0 <= seed < 2**53 for seed in used)  # exact in a JSON number, for every client


async def test_a_seeded_request_keeps_its_seed():
    async with running_server() as (server, engines), Client(*server.address) as client:
        reply = await client.generate("x", max_new_tokens=3, temperature=0.7, seed=11)
    assert reply.stats.seed == 11 and engines[0].calls[0]["sampling"] == SamplingConfig(temperature=0.7, seed=11)


async def test_fresh_seeds_can_be_turned_off():
    async with running_server(fresh_seed=False) as (server, engines), Client(*server.address) as client:
        for _ in range(2):
            reply = await client.generate("x", max_new_tokens=3, temperature=0.7)
            assert reply.stats.seed == 0
    assert seeds_used(engines[0]) == [0, 0]  # [sampling] seed, the old behaviour


async def test_the_openai_reply_reports_its_seed():
    async with running_server(http=True) as (server, engines):
        host, port = server.http_address
        oa = openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key="-", max_retries=0, timeout=10)
        whole = await oa.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0.7)
        stream = await oa.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0.7, stream=True)
        events = [e async for e in stream]
        seeded = await oa.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, temperature=0.7, seed=5)
    used = seeds_used(engines[0])
    assert whole.model_extra["leapfrog"]["seed"] == used[0] and whole.system_fingerprint == f"seed-{used[0]}"
    assert all(e.system_fingerprint == f"seed-{used[1]}" for e in events)  # known before the first token
    assert events[-1].model_extra["leapfrog"]["seed"] == used[1] != used[0]
    assert seeded.model_extra["leapfrog"]["seed"] == 5 == used[2]

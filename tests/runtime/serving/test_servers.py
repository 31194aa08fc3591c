"""End to end on the real model (SmolLM2-135M, float32): the server streams exactly the
tokens the engine decodes on its own, in a lossless speculative mode too, to the native
client and to the openai package, and leaves the KV cache empty."""

from __future__ import annotations

import contextlib
from pathlib import Path

import openai
import pytest

from configs.schema import LeapfrogConfig, ModelConfig, SamplingConfig, ServerConfig
from runtime.serving.client import Client
from runtime.serving.native_server import NativeServer
from runtime.serving.openai_api import OpenAIApi
from runtime.serving.service import Service

pytestmark = pytest.mark.real_model
PROMPT = "Name three colours."
MAX_NEW = 24


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import Engine

    return Engine(ModelConfig(checkpoint="default", dtype="float32", device="cpu", max_context=512))


@contextlib.asynccontextmanager
async def serving(engine):
    config = LeapfrogConfig(model=engine.config, server=ServerConfig(port=0, http_port=0, max_new_tokens=64)).validate()
    service = Service([engine], config)
    server, api = NativeServer(service, config.server), OpenAIApi(service, "smollm2")
    native = await server.start()
    http = await api.start("127.0.0.1", 0)
    try:
        yield native, http
    finally:
        await api.close()
        await server.close()
        service.close()


async def test_served_tokens_equal_the_engines(engine):
    ids = engine.encode_chat(PROMPT)
    reference = [t for step in engine.steps(ids, "ar", MAX_NEW) for t in step.tokens]
    async with serving(engine) as (native, http):
        async with Client(*native) as client:
            ar = await client.generate(PROMPT, mode="ar", max_new_tokens=MAX_NEW)
            pld = await client.generate(PROMPT, mode="pld", max_new_tokens=MAX_NEW)
            # Closing a stream early on the real engine frees its cache too.
            async with client.stream(PROMPT, mode="ar", max_new_tokens=MAX_NEW) as stream:
                async for _ in stream:
                    break
        oa = openai.AsyncOpenAI(base_url=f"http://{http[0]}:{http[1]}/v1", api_key="-", max_retries=0, timeout=60)
        events = await oa.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_NEW, stream=True,
            extra_body={"mode": "ar"},
        )
        text = "".join([e.choices[0].delta.content or "" async for e in events if e.choices])
    assert ar.token_ids == reference and pld.token_ids == reference
    assert ar.text == engine.tokenizer.decode(reference, skip_special_tokens=True) == text
    assert ar.stats.tau == 1.0 and pld.stats.forward_passes <= ar.stats.forward_passes
    assert engine.cache.length == 0


async def test_sampling_parameters_reach_the_engine(engine):
    """A sampled request: the same seed gives the engine's own sampled tokens, in ar and in
    a lossless speculative mode; another seed gives others."""
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    ids = engine.encode_chat(PROMPT)
    reference = [t for step in engine.steps(ids, "ar", MAX_NEW, sampling) for t in step.tokens]
    async with serving(engine) as (native, _), Client(*native) as client:
        options = dict(max_new_tokens=MAX_NEW, temperature=0.9, top_k=50, top_p=0.95)
        ar = await client.generate(PROMPT, mode="ar", seed=7, **options)
        pld = await client.generate(PROMPT, mode="pld", seed=7, **options)
        other = await client.generate(PROMPT, mode="ar", seed=8, **options)
    assert ar.token_ids == reference and pld.token_ids == reference
    assert other.token_ids != reference
    assert engine.cache.length == 0


async def test_an_unseeded_reply_is_reproduced_by_its_reported_seed(engine):
    """Two unseeded sampled requests differ (issue 40: the default seed 0 made them equal);
    each reports its seed, and that seed gives the same tokens again, in ar and in a
    lossless speculative mode."""
    options = dict(max_new_tokens=MAX_NEW, temperature=1.0)
    async with serving(engine) as (native, _), Client(*native) as client:
        first = await client.generate("Tell me a story.", mode="pld", **options)
        second = await client.generate("Tell me a story.", mode="pld", **options)
        ar = await client.generate("Tell me a story.", mode="ar", seed=first.stats.seed, **options)
        ht = await client.generate("Tell me a story.", mode="ht-pld", seed=first.stats.seed, **options)
    assert first.stats.seed != second.stats.seed and first.token_ids != second.token_ids
    assert ar.token_ids == first.token_ids == ht.token_ids
    assert engine.cache.length == 0


async def test_a_tiny_temperature_serves_the_greedy_tokens(engine):
    """temperature 1e-40 overflowed float32 into NaN (garbage text, issue 17): it must give
    exactly the greedy tokens, over both protocols, in ar and in tree modes."""
    ids = engine.encode_chat(PROMPT)
    greedy = [t for step in engine.steps(ids, "ar", MAX_NEW) for t in step.tokens]
    async with serving(engine) as (native, http):
        async with Client(*native) as client:
            for mode in ("ar", "pld", "ht-pld"):
                reply = await client.generate(PROMPT, mode=mode, max_new_tokens=MAX_NEW, temperature=1e-40, seed=3)
                assert reply.token_ids == greedy, mode
        oa = openai.AsyncOpenAI(base_url=f"http://{http[0]}:{http[1]}/v1", api_key="-", max_retries=0, timeout=60)
        for mode in ("ar", "pld"):
            out = await oa.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_NEW, temperature=1e-40,
                seed=3, extra_body={"mode": mode},
            )
            assert out.choices[0].message.content == engine.tokenizer.decode(greedy, skip_special_tokens=True), mode
    assert engine.cache.length == 0


def test_leapfrog_serve_command():
    """`leapfrog serve` as a user runs it: prints its addresses, serves, stops on SIGTERM."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from runtime.serving.client import SyncClient

    argv = [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--http-port", "-1", "--threads", "1",
            "--max-new-tokens", "8", "--mode", "pld"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = proc.stdout.readline()
        match = re.match(r"leapfrog serve: native protocol on (\S+):(\d+)", first)
        assert match, first + proc.stdout.read() if proc.poll() is not None else first
        assert "mode pld, 1 engine(s)" in proc.stdout.readline()
        with SyncClient(match[1], int(match[2]), timeout=60) as client:
            reply = client.generate(PROMPT)
        assert reply.stats.tokens == 8 and reply.stats.mode == "pld" and reply.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

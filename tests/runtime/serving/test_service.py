"""The Service itself, without a front end: a reader that falls behind holds its decode
back (at most CHUNKS_AHEAD chunks wait unread), and a cancel frees the engine."""

from __future__ import annotations

import asyncio

from mock_engine import STOP, MockEngine
from serving import endless, wait_until

from configs.schema import LeapfrogConfig
from runtime.decoding.steps import Step
from runtime.serving.protocol import Chunk, Request, Stats
from runtime.serving.service import CHUNKS_AHEAD, Cancellation, Service


def counting_endless(engine) -> list[int]:
    """endless() that also counts the steps the service pulled from it."""
    endless(engine, step_tokens=4)
    pulled, steps = [0], engine.steps

    def counted(*args, **kwargs):
        for step in steps(*args, **kwargs):
            pulled[0] += 1
            yield step

    engine.steps = counted
    return pulled


async def test_a_reader_that_stops_reading_holds_its_decode_back_then_a_cancel_frees_the_engine():
    engine = MockEngine()
    pulled = counting_endless(engine)
    service = Service([engine], LeapfrogConfig())
    try:
        job = await service.prepare(Request(id=1, prompt="hi", max_new_tokens=64))
        cancel = Cancellation()
        items = service.run(job, cancel)
        first = await anext(items)  # the reader takes one chunk, then stops reading
        assert isinstance(first, Chunk)
        await wait_until(lambda: pulled[0] >= CHUNKS_AHEAD)
        await asyncio.sleep(0.3)  # time for a decode that ignored its reader to run far ahead
        assert CHUNKS_AHEAD <= pulled[0] <= CHUNKS_AHEAD + 2
        cancel.set()
        await items.aclose()
        await wait_until(lambda: service.free_engines == 1 and engine.cache.length == 0)
    finally:
        service.close()


async def test_a_reader_that_keeps_up_gets_a_reply_of_many_more_chunks_than_may_wait():
    engine = MockEngine()
    reply = [ord("a") + 1 + i % 26 for i in range(3 * CHUNKS_AHEAD)] + [STOP]

    def steps(prompt_ids, mode, max_new_tokens, sampling=None):
        for token in reply:  # one token per step: 3 * CHUNKS_AHEAD + 1 chunks
            yield Step([token], None, 1)

    engine.steps = steps
    service = Service([engine], LeapfrogConfig())
    try:
        job = await service.prepare(Request(id=1, prompt="hi", max_new_tokens=400))
        items = [item async for item in service.run(job, Cancellation())]
    finally:
        service.close()
    assert [t for item in items if isinstance(item, Chunk) for t in item.token_ids] == reply
    assert isinstance(items[-1], Stats) and items[-1].finish_reason == "stop" and items[-1].tokens == len(reply)

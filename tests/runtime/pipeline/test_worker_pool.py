"""An engine's pipelined runtime (runtime.pipeline.worker_pool): the transport its config
names, the coordinator on its own event loop, replies as a plain iterator, a clean close."""

import asyncio
import threading
import time

import pytest

import runtime.pipeline.worker_pool as worker_pool
from configs.schema import DrafterConfigs, ModelConfig, PipelineConfig
from runtime.engine import Engine
from runtime.pipeline.local_transport import LocalTransport
from runtime.pipeline.worker_pool import WorkerPool


@pytest.fixture(scope="module")
def engine():
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=512), DrafterConfigs(),
                  PipelineConfig(transport="local", workers=2))


def test_a_pool_starts_its_workers_streams_a_reply_and_closes(engine):
    pool = WorkerPool(engine)
    assert isinstance(pool.transport, LocalTransport) and pool.transport.size == 2
    pool.start()
    assert sorted(pool.transport.handles) == [0, 1]  # both replicas exist before the first reply
    ids = engine.encode_chat("Count from one to five.")
    ar = [t for s in engine.steps(ids, "ar", 16) for t in s.tokens]
    replies = pool.generate("pipeline", ids, 16, None)
    first = next(replies)
    assert first.tokens == ar[: len(first.tokens)]
    rest = [t for s in replies for t in s.tokens]
    assert first.tokens + rest == ar
    assert pool.coordinator.last_metrics.tokens == len(ar)
    pool.close()
    assert pool.transport.handles == {}
    deadline = time.monotonic() + 5
    while pool.loop.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pool.loop.is_running()  # the coordinator's loop thread ends with the pool


def test_an_abandoned_reply_frees_the_coordinator(engine):
    pool = WorkerPool(engine)
    ids = engine.encode_chat("Count from one to five.")
    replies = pool.generate("pipeline", ids, 32, None)
    next(replies)
    replies.close()  # the caller stops reading: the reply is drained, the lock released
    again = [t for s in pool.generate("pipeline", ids, 8, None) for t in s.tokens]
    assert again == [t for s in engine.steps(ids, "ar", 8) for t in s.tokens]
    pool.close()


def test_a_transport_that_fails_to_build_leaves_no_thread(engine, monkeypatch):
    def broken(engine):
        raise RuntimeError("no cluster")

    monkeypatch.setattr(worker_pool, "build_transport", broken)
    coordinator_threads = lambda: [t for t in threading.enumerate() if t.name == "leapfrog-coordinator"]  # noqa: E731
    before = len(coordinator_threads())
    with pytest.raises(RuntimeError, match="no cluster"):
        WorkerPool(engine)
    assert len(coordinator_threads()) == before


class NeverPlaced(LocalTransport):
    """No replica is ever placed (a cluster without the resources)."""

    async def handle(self, i):
        await asyncio.Event().wait()


def test_a_cancel_interrupts_the_wait_for_workers(engine, monkeypatch):
    monkeypatch.setattr(worker_pool, "build_transport", lambda engine: NeverPlaced(2, None))
    pool = WorkerPool(engine)
    ids = engine.encode_chat("Count from one to five.")
    replies: list = []
    waiting = threading.Thread(target=lambda: replies.append(list(pool.generate("pipeline", ids, 8, None))))
    waiting.start()
    time.sleep(0.5)
    engine.cancelled.set()  # from another thread, as the server's cancel does
    waiting.join(10)
    assert not waiting.is_alive() and replies == [[]]  # the reply ended, empty, without a worker
    engine.cancelled.clear()
    pool.close()

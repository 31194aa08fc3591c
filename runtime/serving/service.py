"""What both front ends serve: requests checked, queued for an engine, decoded in a thread.

Each engine (a KV cache and tokenizer on the one shared model: Engine.sibling) decodes one request at a time, so the
service keeps a pool of engines: `concurrency` of them. A request waits for a free
engine in FIFO order; when `max_queue` requests already wait it is refused
("overloaded"). Decoding is synchronous tensor work, so it runs in a worker thread and
hands each Step to the event loop as soon as it is committed; the loop stays free to
read cancels, accept connections and stream to everyone else. The thread runs at most
CHUNKS_AHEAD chunks ahead of the reader: a client that reads slowly slows its decode
instead of piling its reply up in memory (and one that stops reading is cut by the front
end's write timeout, which cancels the decode).

Whatever ends a request -- its last token, a cancel, the client leaving, an error --
the worker thread empties the engine's KV cache before the engine goes back to the
pool, so no cache space outlives its request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from configs.schema import ConfigError, LeapfrogConfig, SamplingConfig
from runtime.engine import PromptTooLongError
from runtime.modes import UnknownModeError, check_mode
from runtime.pipeline.worker_pool import Cancelled
from runtime.serving.limits import allowed_modes, prompt_bytes
from runtime.serving.protocol import Chunk, Error, ErrorCode, ProtocolError, Request, Stats
from runtime.text.stream import TextStream

log = logging.getLogger("leapfrog.serve")
INTERNAL_MESSAGE = "internal error; the server log has the details"
CHUNKS_AHEAD = 64  # chunks a decode may emit that its reader has not taken yet
# A fresh seed is below 2**53, so that it is exact in a JSON number (a double) in every
# client's hands: one sent back must be the one that was used.
FRESH_SEED_LIMIT = 2**53


@dataclass
class Job:
    """A request that passed every check: token ids and settled limits."""

    id: int
    prompt_ids: list[int]
    mode: str
    max_new_tokens: int
    sampling: SamplingConfig


class Cancellation:
    """Set from the event loop; read by the loop (while queued) and by the worker thread."""

    def __init__(self):
        self.thread_flag = threading.Event()
        self.loop_flag = asyncio.Event()

    def set(self) -> None:
        self.thread_flag.set()
        self.loop_flag.set()

    def is_set(self) -> bool:
        return self.thread_flag.is_set()


class Service:
    def __init__(self, engines: list, config: LeapfrogConfig):
        if not engines:
            raise ValueError("a service needs at least one engine")
        self.engines = engines
        self.config = config
        self.tokenizer = engines[0].tokenizer
        self.modes = allowed_modes(config)
        self._free: asyncio.LifoQueue | None = None  # made on first use, inside the running loop
        self.waiting = 0
        # Decoding threads (one per engine) and one more for tokenizing prompts, so a
        # long prompt never stalls the event loop.
        self._decoders = ThreadPoolExecutor(len(engines), thread_name_prefix="leapfrog-decode")
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="leapfrog-encode")

    @property
    def free_engines(self) -> int:
        return len(self.engines) if self._free is None else self._free.qsize()

    def close(self) -> None:
        self._decoders.shutdown(wait=True, cancel_futures=True)
        self._encoder.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------- checking

    async def prepare(self, request: Request, raw_prompt: bool = False) -> Job:
        """Check a request and tokenize its prompt; ProtocolError (with the request id) if
        anything is wrong. raw_prompt: encode `prompt` as plain text, no chat template
        (the OpenAI completions endpoint)."""
        try:
            return await self._prepare(request, raw_prompt)
        except ProtocolError as e:
            e.request_id = request.id
            raise

    async def _prepare(self, r: Request, raw_prompt: bool) -> Job:
        gen, limit = self.config.generation, self.config.server.max_new_tokens
        if (r.prompt is None) == (r.messages is None):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "a request needs exactly one of 'prompt' and 'messages'")
        if not (r.prompt or r.messages):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "the prompt is empty")
        mode = r.mode if r.mode is not None else gen.mode
        try:
            check_mode(mode)
        except UnknownModeError as e:
            raise ProtocolError(ErrorCode.UNKNOWN_MODE, str(e)) from None
        if mode not in self.modes:
            raise ProtocolError(ErrorCode.MODE_NOT_ALLOWED, f"mode {mode!r} is not offered here; offered: {', '.join(sorted(self.modes))}")
        max_new = r.max_new_tokens if r.max_new_tokens is not None else min(gen.max_new_tokens, limit)
        if not 1 <= max_new <= limit:
            raise ProtocolError(ErrorCode.INVALID_MAX_NEW_TOKENS, f"max_new_tokens must be in [1, {limit}], got {max_new}")
        sampling = self._sampling(r)
        prompt = r.prompt if r.prompt is not None else r.messages
        size, byte_limit = prompt_bytes(prompt), self.config.server.max_prompt_bytes
        if size > byte_limit:  # before any tokenizing work is spent on it
            raise ProtocolError(ErrorCode.PROMPT_TOO_LONG, f"the prompt is {size} bytes; the limit is {byte_limit} bytes")
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(self._encoder, self._encode, prompt, raw_prompt)
        except Exception:  # the chat template rejects the messages
            log.warning("request %s: cannot encode the prompt", r.id, exc_info=True)
            raise ProtocolError(ErrorCode.INVALID_FIELD, "cannot encode the prompt with this model's chat template") from None
        try:
            self.engines[0].check_fits(ids, max_new)
        except PromptTooLongError as e:
            raise ProtocolError(ErrorCode.PROMPT_TOO_LONG, str(e)) from None
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, str(e)) from None
        return Job(r.id, ids, mode, max_new, sampling)

    def _sampling(self, r: Request) -> SamplingConfig:
        d = self.config.sampling
        pick = lambda value, default: default if value is None else value  # noqa: E731
        try:  # a SamplingConfig validates itself as it is made
            return SamplingConfig(
                temperature=float(pick(r.temperature, d.temperature)),
                top_k=pick(r.top_k, d.top_k),
                top_p=float(pick(r.top_p, d.top_p)),
                seed=pick(r.seed, self._unseeded()),
            )
        except ConfigError as e:
            raise ProtocolError(ErrorCode.INVALID_SAMPLING, str(e)) from None

    def _unseeded(self) -> int:
        """The seed of a request that sent none: fresh entropy ([server] fresh_seed; clients
        expect a new sample each time), else the [sampling] seed. Stats reports it either way."""
        if self.config.server.fresh_seed:
            return secrets.randbelow(FRESH_SEED_LIMIT)
        return self.config.sampling.seed

    def _encode(self, prompt, raw: bool) -> list[int]:
        if raw:
            return list(self.tokenizer.encode(prompt))
        return self.engines[0].encode_chat(prompt)

    # ----------------------------------------------------------------------- running

    async def run(self, job: Job, cancel: Cancellation) -> AsyncIterator[Chunk | Stats | Error]:
        """Queue for an engine, then stream the job's Chunks; the last item is its Stats
        (or an Error). Raises ProtocolError("overloaded") when the queue is full."""
        if self._free is None:
            # The engine freed last goes out first: a lone client keeps one engine (its
            # cache and buffers warm); waiting requests are still served in FIFO order.
            self._free = asyncio.LifoQueue()
            for engine in self.engines:
                self._free.put_nowait(engine)
        queued = time.perf_counter()
        engine = await self._acquire(cancel)
        if engine is None:  # cancelled while waiting
            yield Stats(job.id, "cancelled", len(job.prompt_ids), 0, 0, 0.0, time.perf_counter() - queued, 0.0, 0.0, job.mode,
                        seed=job.sampling.seed)
            return
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        credit = threading.Semaphore(CHUNKS_AHEAD)  # the decode takes one per Chunk, the reader gives it back
        queue_seconds = time.perf_counter() - queued
        done = loop.run_in_executor(self._decoders, self._decode, engine, job, cancel, emit, credit, queue_seconds)
        # The engine goes back only once its thread is done with it (cache emptied).
        done.add_done_callback(lambda _: self._free.put_nowait(engine))
        try:
            while (item := await items.get()) is not None:
                if isinstance(item, Chunk):
                    credit.release()
                yield item
        finally:
            cancel.set()  # a no-op after a normal end; stops the worker if our reader left

    async def _acquire(self, cancel: Cancellation):
        if self._free.empty() and self.waiting >= self.config.server.max_queue:
            raise ProtocolError(ErrorCode.OVERLOADED, f"{self.waiting} requests are already waiting; try again later")
        self.waiting += 1
        get = asyncio.ensure_future(self._free.get())
        stop = asyncio.ensure_future(cancel.loop_flag.wait())
        got = False
        try:
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            got = not cancel.is_set()
        finally:  # also when our task is cancelled: an engine already taken goes back
            self.waiting -= 1
            stop.cancel()
            get.cancel()
            engine = get.result() if get.done() and not get.cancelled() else None
            if engine is not None and not got:
                self._free.put_nowait(engine)
                engine = None
        return engine

    def _decode(self, engine, job: Job, cancel: Cancellation, emit, credit: threading.Semaphore, queue_seconds: float) -> None:
        """Worker thread: run the job on `engine`, emitting Chunks then Stats (or Error), then
        None. Each Chunk waits for a `credit` (the reader is at most CHUNKS_AHEAD behind)."""
        text = TextStream(engine.tokenizer)
        tokens = passes = 0
        last = None
        ttft = 0.0
        start = time.perf_counter()
        steps = None
        engine.cancelled = cancel.thread_flag  # a cancel also ends a pipelined reply's wait for its workers
        try:
            finish = "length"
            try:
                steps = engine.steps(job.prompt_ids, job.mode, job.max_new_tokens, sampling=job.sampling)
            except Cancelled:  # while the mode's workers were being placed
                steps = ()
            for step in steps:
                if not reader_caught_up(credit, cancel):
                    break
                if not tokens:
                    ttft = time.perf_counter() - start
                tokens += len(step.tokens)
                passes += step.forward_passes
                last = step.tokens[-1] if step.tokens else last
                emit(Chunk(job.id, text.push(step.tokens), list(step.tokens), step.forward_passes))
            if cancel.is_set():
                finish = "cancelled"
            else:
                finish = "stop" if last in engine.stop_ids else "length"
                if (tail := text.flush()) and reader_caught_up(credit, cancel):
                    emit(Chunk(job.id, tail, [], 0))
            seconds = time.perf_counter() - start
            emit(Stats(job.id, finish, len(job.prompt_ids), tokens, passes, tokens / max(passes, 1),
                       queue_seconds, ttft, seconds, job.mode, **engine.lane.reply.summary(), seed=job.sampling.seed))
        except UnknownModeError as e:
            emit(Error(ErrorCode.UNKNOWN_MODE, str(e), job.id))
        except PromptTooLongError as e:
            emit(Error(ErrorCode.PROMPT_TOO_LONG, str(e), job.id))
        except Exception:  # a bug or a device failure: this request fails, the server goes on
            log.exception("request %s: decoding failed (mode %s)", job.id, job.mode)
            emit(Error(ErrorCode.INTERNAL, INTERNAL_MESSAGE, job.id))
        finally:
            if steps is not None and hasattr(steps, "close"):
                steps.close()
            engine.cancelled = threading.Event()
            engine.cache.truncate(0)
            emit(None)


def reader_caught_up(credit: threading.Semaphore, cancel: Cancellation) -> bool:
    """Decode thread: wait until the reader has room for one more Chunk; False once the
    request is cancelled (the reader left, or stopped reading and was cut)."""
    while not credit.acquire(timeout=0.05):
        if cancel.is_set():
            return False
    return not cancel.is_set()

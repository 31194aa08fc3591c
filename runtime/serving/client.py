"""Python client of the native protocol (runtime.serving.protocol).

    async with Client("127.0.0.1", 7860) as client:
        async for chunk in client.stream("Write a haiku.", max_new_tokens=64):
            print(chunk.text, end="", flush=True)
        reply = await client.generate([{"role": "user", "content": "Hi"}])

    with SyncClient("127.0.0.1", 7860) as client:   # the same, blocking
        for chunk in client.stream("Write a haiku."):
            ...

A Client keeps its idle connections and reuses them; streams running at the same time
each take their own connection. Closing a stream early (break, aclose(), an exception in
the loop body) sends a cancel, so the server stops decoding for it. Errors the server
reports raise ServerError with its code; a dead connection raises ConnectionError and a
server silent for `timeout` seconds raises TimeoutError. `api_key` is sent in a hello
frame at the start of every connection (servers with [server] api_key require it).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from runtime.serving.protocol import Cancel, Chunk, Error, ErrorCode, Hello, Request, Stats, decode, encode, read_frame

# Server frames are small (a chunk per decoding step); this only bounds a broken server.
MAX_SERVER_FRAME = 64 << 20


class ServerError(Exception):
    """An Error frame from the server: .code (runtime.serving.protocol.ErrorCode) and .message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code, self.message = code, message


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    stats: Stats
    chunks: int = 0  # how many chunks (decoding steps) it came in


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def send(self, message) -> None:
        self.writer.write(encode(message))
        await self.writer.drain()

    async def receive(self, timeout: float):
        body = await asyncio.wait_for(read_frame(self.reader, MAX_SERVER_FRAME), timeout)
        if body is None:
            raise ConnectionResetError("the server closed the connection")
        return decode(body)

    def close(self) -> None:
        self.writer.close()

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()


class _Outcome:
    stats: Stats | None = None


class Stream:
    """An async iterator of Chunks; `.stats` holds the Stats frame once it has ended."""

    def __init__(self, chunks: AsyncIterator[Chunk], outcome: _Outcome):
        # The generator gets the outcome, not the stream: no reference cycle, so a stream
        # dropped after a bare `break` is finalized (and cancelled) right away.
        self._chunks, self._outcome = chunks, outcome

    @property
    def stats(self) -> Stats | None:
        return self._outcome.stats

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        """Stop early: the server is told to cancel the request."""
        await self._chunks.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 7860, *, timeout: float = 60.0, connect_timeout: float = 10.0,
                 api_key: str | None = None):
        self.host, self.port = host, port
        self.api_key = api_key  # sent in a hello frame first on every connection
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._idle: list[_Connection] = []
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def stream(self, prompt: str | list[dict], *, max_new_tokens: int | None = None, mode: str | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None) -> Stream:
        """Stream the reply to a user message (str) or chat messages ([{"role", "content"}])."""
        messages = None if isinstance(prompt, str) else prompt
        request = Request(next(self._ids), prompt if messages is None else None, messages, mode, max_new_tokens,
                          temperature, top_k, top_p, seed)
        outcome = _Outcome()
        return Stream(self._run(request, outcome), outcome)

    async def generate(self, prompt: str | list[dict], **options) -> Reply:
        """The whole reply; options as for stream()."""
        text, ids, n = [], [], 0
        async with self.stream(prompt, **options) as stream:
            async for chunk in stream:
                text.append(chunk.text)
                ids += chunk.token_ids
                n += 1
        return Reply("".join(text), ids, stream.stats, n)

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.connect_timeout)
        conn = _Connection(reader, writer)
        if self.api_key is not None:
            await conn.send(Hello(self.api_key))
        return conn

    async def _start(self, request: Request) -> tuple[_Connection, object]:
        """Send the request and read the server's first answer. A pooled connection the
        server has meanwhile closed (idle timeout) fails here: retry once on a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.usable:
                conn.close()
                continue
            try:
                await conn.send(request)
                first = await self._receive(conn, request.id)
                if not (isinstance(first, Error) and first.code == ErrorCode.IDLE_TIMEOUT):
                    return conn, first
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except BaseException:  # a timeout, or our task cancelled: the request may be running
                conn.close()
                raise
            conn.close()
        conn = await self._connect()
        try:
            await conn.send(request)
            return conn, await self._receive(conn, request.id)
        except BaseException:
            conn.close()
            raise

    async def _receive(self, conn: _Connection, request_id: int):
        """The next frame about this request (or about the connection)."""
        while True:
            message = await conn.receive(self.timeout)
            if getattr(message, "id", None) in (request_id, None):
                return message
            # A frame of an earlier request on this connection (one that crossed its cancel).

    async def _run(self, request: Request, outcome: _Outcome) -> AsyncIterator[Chunk]:
        conn, message = await self._start(request)
        ended = False  # the request is over on the server: the connection can be reused
        try:
            while True:
                if isinstance(message, Chunk):
                    yield message
                elif isinstance(message, Stats):
                    outcome.stats, ended = message, True
                    return
                elif isinstance(message, Error):
                    ended = message.id is not None
                    if not ended:  # about the connection, which the server may close: drop it
                        conn.close()
                    raise ServerError(message.code, message.message)
                message = await self._receive(conn, request.id)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            conn.close()
            raise
        finally:
            if not ended and not conn.writer.is_closing():
                ended = await self._cancel(conn, request.id)
            if ended and conn.usable:
                self._idle.append(conn)
            else:
                conn.close()

    async def _cancel(self, conn: _Connection, request_id: int) -> bool:
        """Ask the server to stop the request and wait until it has; False if the
        connection cannot be reused."""
        try:
            await conn.send(Cancel(request_id))
            while True:
                message = await self._receive(conn, request_id)
                if isinstance(message, (Stats, Error)):
                    return message.id is not None
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            return False


class SyncClient:
    """Client for code without an event loop: the same methods, blocking. Not thread-safe:
    use one per thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7860, **options):
        self._loop = asyncio.new_event_loop()
        self._client = Client(host, port, **options)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
            self._loop.close()

    def generate(self, prompt: str | list[dict], **options) -> Reply:
        return self._loop.run_until_complete(self._client.generate(prompt, **options))

    def stream(self, prompt: str | list[dict], **options) -> SyncStream:
        return SyncStream(self._loop, self._client.stream(prompt, **options))


class SyncStream:
    """An iterator of Chunks; .stats once it has ended; close() (or leaving a `with`) cancels."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: Stream):
        self._loop, self._stream = loop, stream
        self._open = True

    @property
    def stats(self) -> Stats | None:
        return self._stream.stats

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        try:
            return self._loop.run_until_complete(self._stream.__anext__())
        except StopAsyncIteration:
            self._open = False
            raise StopIteration from None
        except BaseException:
            self._open = False
            raise

    def close(self) -> None:
        if self._open and not self._loop.is_closed():
            self._open = False
            self._loop.run_until_complete(self._stream.aclose())

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a loop left early without close(): still cancel on the server
        if self._open and not self._loop.is_closed() and not self._loop.is_running():
            self.close()

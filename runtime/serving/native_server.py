"""The native server: asyncio TCP, one Connection per client, frames of runtime.serving.protocol.

A connection reads frames in a loop. A Request starts a task that checks it, queues it
(runtime.serving.service) and streams its Chunks and Stats; a Cancel, or the client leaving,
sets the request's Cancellation. Nothing a client sends can take the server down: a bad
frame gets an Error frame and the connection goes on (after a frame over the size limit,
whose body is never read, it is closed); connections over the limit are refused; a
connection that sits idle (no request running, no complete frame) for idle_timeout
seconds is closed, which also ends half-open connections and slow drips.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from configs.schema import ServerConfig
from runtime.serving.protocol import Cancel, Error, ErrorCode, Message, ProtocolError, Request, Stats, decode, encode, read_frame
from runtime.serving.service import Cancellation, Service


class NativeServer:
    def __init__(self, service: Service, config: ServerConfig):
        self.service = service
        self.config = config
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (port 0 in the config picks a free one)."""
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        """Stop listening, close every connection (cancelling its request) and wait for
        their tasks, so that nothing is left running on the loop."""
        if self._server is None:
            return
        self._server.close()
        tasks = []
        for conn in list(self.connections):
            conn.close()
            tasks += [t for t in (conn.task, conn.request) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        if len(self.connections) >= self.config.max_connections:
            message = f"the server holds its limit of {self.config.max_connections} connections; try again later"
            await conn.send_quietly(Error(ErrorCode.TOO_MANY_CONNECTIONS, message))
            conn.close()
            return
        self.connections.add(conn)
        conn.task = asyncio.current_task()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)


class Connection:
    def __init__(self, server: NativeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        self.config = server.config
        self.last_active = time.monotonic()
        self.task: asyncio.Task | None = None  # the one running this connection
        self.request: asyncio.Task | None = None  # the request being served, if any
        self.request_id: int | None = None
        self.cancel: Cancellation | None = None
        self._write_lock = asyncio.Lock()

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._close_when_idle())
        try:
            await self._read_loop()
        finally:
            watchdog.cancel()
            if self.cancel is not None:  # the client left (or broke the protocol) mid-request
                self.cancel.set()
            self.close()

    async def _read_loop(self) -> None:
        while True:
            try:
                body = await read_frame(self.reader, self.config.max_frame_bytes)
            except ProtocolError as e:  # over the size limit: the stream cannot be trusted after it
                await self.send_quietly(Error(e.code, e.message, self.request_id))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if body is None:
                return
            self.last_active = time.monotonic()
            try:
                message = decode(body)
            except ProtocolError as e:
                # A broken frame while a request runs ends that request: the client waits for
                # an answer about it, and this error is the answer. The request is cancelled
                # and detached at once, so the connection can take the next one (frames
                # still on their way for the old id are skipped by the client).
                if self.cancel is not None:
                    e.request_id = self.request_id
                    self.cancel.set()
                    self._end_request(self.cancel)
                await self.send_quietly(Error(e.code, e.message, e.request_id))
                continue
            await self._dispatch(message)

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Request):
            if self.request is not None:
                error = f"request {self.request_id} is still running on this connection; open another one"
                await self.send_quietly(Error(ErrorCode.REQUEST_IN_PROGRESS, error, message.id))
                return
            self.request_id, self.cancel = message.id, Cancellation()
            self.request = asyncio.create_task(self._serve(message, self.cancel))
        elif isinstance(message, Cancel):
            if self.request is not None and message.id == self.request_id:
                self.cancel.set()
            # A cancel for a request that already ended is normal (it crossed the Stats frame).
        else:
            await self.send_quietly(Error(ErrorCode.MALFORMED_FRAME, f"clients send request and cancel frames, not {message.type}"))

    async def _serve(self, request: Request, cancel: Cancellation) -> None:
        service = self.server.service
        try:
            job = await service.prepare(request)
            async with contextlib.aclosing(service.run(job, cancel)) as items:
                async for item in items:
                    if isinstance(item, (Stats, Error)):
                        self._end_request(cancel)  # the client may send its next request right away
                    await self.send(item)
        except ProtocolError as e:
            self._end_request(cancel)
            await self.send_quietly(Error(e.code, e.message, request.id))
        except (ConnectionError, asyncio.TimeoutError):
            cancel.set()  # the client is gone or stopped reading: stop decoding for it
            self.close()
        except Exception as e:  # a bug: this request fails, the connection and server go on
            self._end_request(cancel)
            await self.send_quietly(Error(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", request.id))
        finally:
            self._end_request(cancel)

    def _end_request(self, cancel: Cancellation) -> None:
        if self.cancel is cancel:  # not a newer request's state
            self.request = self.request_id = self.cancel = None
            self.last_active = time.monotonic()

    async def send(self, message: Message) -> None:
        """Write one frame; ConnectionError when the client is gone, TimeoutError when it
        has not read for idle_timeout seconds."""
        async with self._write_lock:
            if self.writer.is_closing():
                raise ConnectionResetError("connection closed")
            self.writer.write(encode(message))
            await asyncio.wait_for(self.writer.drain(), self.config.idle_timeout)

    async def send_quietly(self, message: Message) -> None:
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await self.send(message)

    async def _close_when_idle(self) -> None:
        timeout = self.config.idle_timeout
        while True:
            left = self.last_active + timeout - time.monotonic()
            # While a request runs the client may rightly stay silent: look again later.
            await asyncio.sleep(timeout if self.request is not None else max(0.01, left))
            if self.request is None and time.monotonic() - self.last_active >= timeout:
                await self.send_quietly(Error(ErrorCode.IDLE_TIMEOUT, f"no request for {timeout:g} seconds; closing"))
                self.close()
                return

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

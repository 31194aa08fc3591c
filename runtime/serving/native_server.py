"""The native server: asyncio TCP, one Connection per client, frames of runtime.serving.protocol.

A connection reads frames in a loop. A Request starts a task that checks it, queues it
(runtime.serving.service) and streams its Chunks and Stats; a Cancel, or the client leaving,
sets the request's Cancellation. Nothing a client sends can take the server down: a bad
frame gets an Error frame and the connection goes on (after a frame over the size limit,
whose body is never read, it is closed). What one client may hold is bounded
([server] limits, docs/serving.md): connections in all and per peer address; a
connection's unfinished requests (ones it abandoned with a broken frame included); time
without a request (idle_timeout: only a request resets the clock, so neither cancels nor
garbage keep a connection open); time for a frame to arrive once begun, and for a new
connection's first frame (request_timeout); time a written frame may sit unread
(write_timeout). With an API key, the first frame must be a Hello carrying it. An error
that ends the connection is delivered before it closes (runtime.serving.closing), and a
client's mistakes are logged one line each (limits.log_client_mistake).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from configs.schema import ServerConfig
from runtime.serving.closing import linger_then_close
from runtime.serving.limits import ConnectionLimits, key_matches, log_client_mistake, peer_address
from runtime.serving.protocol import (
    Cancel,
    Error,
    ErrorCode,
    Hello,
    Message,
    ProtocolError,
    Request,
    Stats,
    decode,
    encode,
    read_frame,
)
from runtime.serving.service import INTERNAL_MESSAGE, Cancellation, Service

log = logging.getLogger("leapfrog.serve")


class NativeServer:
    def __init__(self, service: Service, config: ServerConfig):
        self.service = service
        self.config = config
        self.connections: set[Connection] = set()
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_peer, config.max_connections_per_range)
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
        """Stop listening, close every connection (cancelling its requests) and wait for
        their tasks, so that nothing is left running on the loop."""
        if self._server is None:
            return
        self._server.close()
        tasks = []
        for conn in list(self.connections):
            conn.close(abort=True)
            tasks += [conn.task, *conn.pending]
        await asyncio.gather(*[t for t in tasks if t is not None], return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        peer = conn.peer
        refusal = self.limits.admit(peer)
        if refusal is not None:
            log_client_mistake("native", peer, f"connection refused: {refusal}")
            await conn.end_with(Error(ErrorCode.TOO_MANY_CONNECTIONS, refusal))
            return
        self.connections.add(conn)
        conn.task = asyncio.current_task()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.limits.release(peer)


class Connection:
    def __init__(self, server: NativeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        self.config = server.config
        self.peer = peer_address(writer.get_extra_info("peername"))
        self.authenticated = not self.config.api_key
        self.last_request = time.monotonic()  # the idle clock: the last request's start or end
        self.task: asyncio.Task | None = None  # the one running this connection
        self.request: asyncio.Task | None = None  # the request being served, if any
        self.request_id: int | None = None
        self.cancel: Cancellation | None = None
        self.pending: set[asyncio.Task] = set()  # request tasks not finished, detached ones too
        self._write_lock = asyncio.Lock()

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._close_when_idle())
        try:
            await self._read_loop()
        finally:
            watchdog.cancel()
            self._detach()  # the client left (or broke the protocol) mid-request
            self.close()

    async def _next_frame(self, first: bool) -> bytes | None:
        """The next frame's body: whole within request_timeout of its first byte, and a new
        connection's first frame within request_timeout of connecting (between requests the
        idle clock rules)."""
        limit, timeout = self.config.max_frame_bytes, self.config.request_timeout
        if first:
            return await asyncio.wait_for(read_frame(self.reader, limit), timeout)
        return await read_frame(self.reader, limit, timeout)

    async def _read_loop(self) -> None:
        first = True
        while True:
            try:
                body = await self._next_frame(first)
            except ProtocolError as e:  # over the size limit: the stream cannot be trusted after it
                log_client_mistake("native", self.peer, f"{e.code}: {e.message}; closing")
                await self.end_with(Error(e.code, e.message, self.request_id))
                return
            except asyncio.TimeoutError:
                timeout = self.config.request_timeout
                log_client_mistake("native", self.peer, f"no whole frame within request_timeout ({timeout:g} s); closing")
                await self.end_with(Error(ErrorCode.REQUEST_TIMEOUT, f"the frame did not arrive within {timeout:g} seconds"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            first = False
            if body is None:
                return
            try:
                message = decode(body)
            except ProtocolError as e:
                log_client_mistake("native", self.peer, f"{e.code}: {e.message}")
                # A broken frame while a request runs ends that request: the client waits for
                # an answer about it, and this error is the answer. The request is cancelled
                # and detached at once, so the connection can take the next one.
                if self.request is not None:
                    e.request_id = self.request_id
                    self._detach()
                if not self.authenticated:
                    e.code, e.message, e.request_id = ErrorCode.UNAUTHORIZED, "the first frame must be a hello with the API key", None
                    await self.end_with(Error(e.code, e.message, e.request_id))
                    return
                await self.send_quietly(Error(e.code, e.message, e.request_id))
                continue
            if not self.authenticated:
                if not (isinstance(message, Hello) and key_matches(self.config.api_key, message.api_key)):
                    log_client_mistake("native", self.peer, "missing or wrong API key; closing")
                    await self.end_with(Error(ErrorCode.UNAUTHORIZED, "missing or wrong API key"))
                    return
                self.authenticated = True
                continue
            await self._dispatch(message)

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, Request):
            if self.request is not None:
                # The message names the running request: built before _detach forgets its id.
                error = f"request {message.id} came while request {self.request_id} runs on this connection; open another one"
                if message.id == self.request_id:  # an error about this id ends that request
                    self._detach()
                await self.send_quietly(Error(ErrorCode.REQUEST_IN_PROGRESS, error, message.id))
                return
            if len(self.pending) >= self.config.max_pending_per_connection:
                error = f"this connection has {len(self.pending)} unfinished requests, its limit; wait for them"
                await self.send_quietly(Error(ErrorCode.TOO_MANY_PENDING, error, message.id))
                return
            self.request_id, self.cancel = message.id, Cancellation()
            self.last_request = time.monotonic()
            self.request = asyncio.create_task(self._serve(message, self.cancel))
            self.pending.add(self.request)
            self.request.add_done_callback(self.pending.discard)
        elif isinstance(message, Cancel):
            if self.request is not None and message.id == self.request_id:
                self.cancel.set()
            # A cancel for a request that already ended is normal (it crossed the Stats frame).
        elif not isinstance(message, Hello):  # a second hello is harmless
            await self.send_quietly(Error(ErrorCode.MALFORMED_FRAME, f"clients send request and cancel frames, not {message.type}"))

    async def _serve(self, request: Request, cancel: Cancellation) -> None:
        service = self.server.service
        try:
            job = await service.prepare(request)
            async with contextlib.aclosing(service.run(job, cancel)) as items:
                async for item in items:
                    if self.cancel is not cancel:
                        return  # detached: the client already has the error that ended it
                    if isinstance(item, (Stats, Error)):
                        self._end_request(cancel)  # the client may send its next request right away
                    await self.send(item)
        except ProtocolError as e:
            log_client_mistake("native", self.peer, f"request {request.id}: {e.code}: {e.message}")
            if self.cancel is cancel:
                self._end_request(cancel)
                await self.send_quietly(Error(e.code, e.message, request.id))
        except (ConnectionError, asyncio.TimeoutError):
            cancel.set()  # the client is gone or stopped reading: stop decoding for it
            self.close(abort=True)
        except Exception:  # a bug: this request fails, the connection and server go on
            log.exception("request %s: serving failed", request.id)
            if self.cancel is cancel:
                self._end_request(cancel)
                await self.send_quietly(Error(ErrorCode.INTERNAL, INTERNAL_MESSAGE, request.id))
        finally:
            self._end_request(cancel)

    def _end_request(self, cancel: Cancellation) -> None:
        if self.cancel is cancel:  # not a newer request's state
            self.request = self.request_id = self.cancel = None
            self.last_request = time.monotonic()

    def _detach(self) -> None:
        """Cancel the running request and forget it: no frame about it is sent any more.
        Its task runs on until its tokenizing (which a thread does, past recall) is done and
        it sees the cancel; until then it counts in `pending`, which bounds that work."""
        if self.request is not None:
            self.cancel.set()
            self._end_request(self.cancel)

    async def send(self, message: Message) -> None:
        """Write one frame; ConnectionError when the client is gone, TimeoutError when it
        has not read it within write_timeout seconds."""
        async with self._write_lock:
            if self.writer.is_closing():
                raise ConnectionResetError("connection closed")
            self.writer.write(encode(message))
            await asyncio.wait_for(self.writer.drain(), self.config.write_timeout)

    async def send_quietly(self, message: Message) -> None:
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await self.send(message)

    async def end_with(self, message: Message) -> None:
        """Send a last frame and close so that it arrives: what the client still sends is
        read and dropped until it closes (a close with its bytes unread would reset the
        connection, and the client would never read the frame)."""
        await self.send_quietly(message)
        await linger_then_close(self.reader, self.writer)

    async def _close_when_idle(self) -> None:
        timeout = self.config.idle_timeout
        while True:
            left = self.last_request + timeout - time.monotonic()
            # While a request runs the client may rightly stay silent: look again later.
            await asyncio.sleep(timeout if self.request is not None else max(0.01, left))
            if self.request is None and time.monotonic() - self.last_request >= timeout:
                await self.send_quietly(Error(ErrorCode.IDLE_TIMEOUT, f"no request for {timeout:g} seconds; closing"))
                self.close()  # the read loop may be reading: it sees the end (a linger here would race it)
                return

    def close(self, abort: bool = False) -> None:
        """Close the connection; `abort`: at once, dropping unsent data (a plain close waits
        until the client has read it, which a client that stopped reading never does)."""
        if abort:
            self.writer.transport.abort()
        elif not self.writer.is_closing():
            self.writer.close()

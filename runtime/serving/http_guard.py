"""The OpenAI endpoint's connections, guarded (aiohttp's low-level server underneath):

- Limits: connections in all, per peer address and per address range
  (runtime.serving.limits.ConnectionLimits). One over them gets a 429 delivered as
  documented: written at once, then the request is read and dropped until the client
  closes (runtime.serving.closing), so it never meets a TCP reset instead.
- A deadline for each request: a new connection's first request, and every later one
  from its first byte, must arrive whole (headers here; the body in OpenAIApi._body,
  against the same `deadline`) within [server] request_timeout. Past it the client gets
  a 408 (`request_timeout`) and the connection closes. Between requests, a keep-alive
  connection may wait idle_timeout (aiohttp's keepalive_timeout).
- Logging: a malformed HTTP message (bad Content-Length, too many or too long headers,
  ...) is the client's mistake: one info line (address, reason) and a 400 in OpenAI's
  error shape, no traceback; a fault of the server keeps aiohttp's error with traceback.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from runtime.serving.closing import LINGER_SECONDS, answer_and_linger
from runtime.serving.limits import ConnectionLimits, log_client_mistake, peer_address
from runtime.serving.protocol import ErrorCode


def error_body(code: str, message: str) -> dict:
    """An error in OpenAI's shape, with the native error code as its "code"."""
    kind = "server_error" if code == ErrorCode.INTERNAL else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def raw_error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP response that closes the connection, for answers written straight to a
    transport (no request object to answer through)."""
    body = json.dumps(error_body(code, message)).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class GuardedServer(web.Server):
    """aiohttp's server with ConnectionLimits and a request deadline for each connection."""

    def __init__(self, handler, limits: ConnectionLimits, request_timeout: float, **kwargs):
        # No access log: a line per request is the operator's proxy's business, not ours.
        super().__init__(handler, lingering_time=LINGER_SECONDS, access_log=None, **kwargs)
        self.limits = limits
        self.request_timeout = request_timeout

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        if isinstance(handler, GuardedHandler):
            handler.release()
        super().connection_lost(handler, exc)


class GuardedHandler(RequestHandler):
    """One connection: admitted (or refused) when it opens, its requests under a deadline."""

    def __init__(self, manager: GuardedServer, **kwargs):
        super().__init__(manager, **kwargs)
        self.guard = manager
        self.peer: str | None = None  # set while the connection counts in the limits
        self.refused = False  # refused when it opened: whatever it sends is dropped
        self.deadline: float | None = None  # loop time by which the current request must be in, whole
        self._timer: asyncio.TimerHandle | None = None
        self._bytes_while_busy = False  # the next request began while this one was being answered

    # ------------------------------------------------------------------- admission

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = peer_address(transport.get_extra_info("peername"))
        refusal = self.guard.limits.admit(peer)
        if refusal is not None:
            self.refused = True
            log_client_mistake("HTTP", peer, f"connection refused: {refusal}")
            answer_and_linger(transport, raw_error_response(429, ErrorCode.TOO_MANY_CONNECTIONS, refusal))
            return
        self.peer = peer
        super().connection_made(transport)
        self._start_deadline()  # its first request must come in time, not in idle_timeout

    def release(self) -> None:
        """Leave the limits (once): at connection_lost, or when the connection is doomed."""
        if self.peer is not None:
            self.guard.limits.release(self.peer)
            self.peer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        if self.refused:
            return  # aiohttp never saw it open
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # dropped: the 429 is on its way, the connection closes at the client's end of file
        if not data:
            pass  # aiohttp feeds b"" itself when it resumes reading: no byte of the client's
        elif self._request_in_progress:
            self._bytes_while_busy = True
        elif self._timer is None:
            self._start_deadline()  # the first byte of a request: the rest must follow in time
        super().data_received(data)

    # ------------------------------------------------------------------- the deadline

    def _start_deadline(self) -> None:
        self._stop_timer()
        timeout = self.guard.request_timeout
        self.deadline = self._loop.time() + timeout
        self._timer = self._loop.call_at(self.deadline, self._overdue)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _handle_request(self, request, start_time, request_handler):
        # The headers are in: the timer stops, the body is read against the same deadline.
        self._stop_timer()
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self.deadline = None
            if self._bytes_while_busy and not self._force_close:
                self._bytes_while_busy = False
                self._start_deadline()

    def _overdue(self) -> None:
        """The deadline passed with no whole request header in: a 408, and close."""
        self._timer = None
        if self._request_in_progress or self._messages or self._force_close or self.transport is None:
            return  # a request is in (its body has its own wait), or the connection is ending anyway
        timeout = self.guard.request_timeout
        log_client_mistake("HTTP", self.peer, f"no whole request within request_timeout ({timeout:g} s); closing")
        transport = self.transport
        self._force_close = True  # aiohttp drops what arrives from now on, and its loop ends
        if self._waiter is not None:
            self._waiter.cancel()
        self.release()
        message = f"the request did not arrive within {timeout:g} seconds"
        answer_and_linger(transport, raw_error_response(408, ErrorCode.REQUEST_TIMEOUT, message))

    # ------------------------------------------------------------------- malformed messages

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # a server fault: logged with its traceback
        reason = " ".join((exc.message or type(exc).__name__).split())  # aiohttp's message spans lines
        log_client_mistake("HTTP", self.peer, f"malformed HTTP message ({type(exc).__name__}): {reason}")
        response = web.json_response(error_body(ErrorCode.MALFORMED_FRAME, f"malformed HTTP message: {reason[:200]}"),
                                     status=status if 400 <= status < 500 else 400)
        response.force_close()
        return response

"""OpenAI-compatible HTTP endpoint (aiohttp) on the same Service as the native server:
GET /v1/models, POST /v1/chat/completions and /v1/completions, streamed as server-sent
events when "stream" is true, so tools built on the OpenAI API work unchanged.

Requests map onto runtime.serving.protocol.Request (runtime.serving.openai_request) and go
through the same checks and queue as native ones. Leapfrog's own options ride along as
extra fields: "mode" and "top_k" (the openai package sends them with extra_body). Every
error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the native
error code as "code": 400 for a malformed request, 401 without the API key, 404 for an
unknown path, 408 for a request not in within request_timeout, 413 for a body over
max_frame_bytes, 415 for a body that is not JSON, 422 for a mode the server does not
offer, 429 when overloaded or over the connection limits, 500 only for a fault of the
server itself (its details go to the log, never to the client). Every write to a client
has write_timeout seconds; one that does not read loses its connection (and its decode is
cancelled). runtime.serving.http_guard guards the connections: limits, the request
deadline, malformed HTTP messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging

from aiohttp import web

from configs.schema import ServerConfig
from runtime.serving.http_guard import GuardedServer, error_body
from runtime.serving.limits import ConnectionLimits, key_matches, log_client_mistake
from runtime.serving.openai_reply import CompletionBuilder
from runtime.serving.openai_request import parse_body, to_request
from runtime.serving.protocol import Error, ErrorCode, ProtocolError, Stats
from runtime.serving.service import INTERNAL_MESSAGE, Cancellation, Service

log = logging.getLogger("leapfrog.serve")
STATUS = {
    ErrorCode.UNAUTHORIZED: 401, ErrorCode.NOT_FOUND: 404, ErrorCode.REQUEST_TIMEOUT: 408, ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415, ErrorCode.MODE_NOT_ALLOWED: 422, ErrorCode.OVERLOADED: 429,
    ErrorCode.TOO_MANY_CONNECTIONS: 429, ErrorCode.INTERNAL: 500,
}  # anything else: 400


class OpenAIApi:
    def __init__(self, service: Service, model_name: str):
        self.service = service
        self.config: ServerConfig = service.config.server
        self.model_name = model_name
        self._ids = itertools.count(1)
        self.routes = {
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): lambda http: self._complete(http, chat=True),
            ("POST", "/v1/completions"): lambda http: self._complete(http, chat=False),
        }
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        # handler_cancellation: a client that hangs up cancels its handler, which closes
        # the request's stream and so stops its decode (non-streaming requests too).
        c = self.config
        limits = ConnectionLimits(c.max_http_connections, c.max_connections_per_peer, c.max_connections_per_range)
        server = GuardedServer(self._guarded, limits, c.request_timeout, handler_cancellation=True,
                               keepalive_timeout=c.idle_timeout)
        self._runner = web.ServerRunner(server, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, http: web.BaseRequest) -> web.StreamResponse:
        route = self.routes.get((http.method, http.path))
        if route is None:
            return await self._send_error(http, ErrorCode.NOT_FOUND, f"no route {http.method} {http.path[:80]}")
        scheme, _, token = http.headers.get("Authorization", "").partition(" ")
        if not key_matches(self.config.api_key, token.strip() if scheme.lower() == "bearer" else None):
            log.info("HTTP request from %s: missing or wrong API key", http.remote)
            return await self._send_error(http, ErrorCode.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer ...)")
        try:
            return await route(http)
        except ProtocolError as e:
            log_client_mistake("HTTP", http.remote, f"{http.method} {http.path[:80]}: {e.code}: {e.message}")
            return await self._send_error(http, e.code, e.message)

    async def models(self, http: web.BaseRequest) -> web.StreamResponse:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "leapfrog"}
        return await self._send_json(http, {"object": "list", "data": [model]})

    async def _body(self, http: web.BaseRequest) -> bytes:
        """The request body, refused with 413 once it passes max_frame_bytes (before reading
        it at all when Content-Length says so), and with 408 when it is not in by the
        request's deadline (http_guard: request_timeout from the request's first byte)."""
        limit = self.config.max_frame_bytes
        if http.content_length is not None and http.content_length > limit:
            raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, f"the body is {http.content_length} bytes; the limit is {limit}")
        loop = asyncio.get_running_loop()
        deadline = getattr(http.protocol, "deadline", None) or loop.time() + self.config.request_timeout
        body = bytearray()
        while chunk := await self._within(deadline, http.content.read(65536)):
            body += chunk
            if len(body) > limit:
                raise ProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, f"the body is over the limit of {limit} bytes")
        return bytes(body)

    async def _within(self, deadline: float, reading):
        try:
            return await asyncio.wait_for(reading, max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            message = f"the request did not arrive within {self.config.request_timeout:g} seconds"
            raise ProtocolError(ErrorCode.REQUEST_TIMEOUT, message) from None

    async def _complete(self, http: web.BaseRequest, chat: bool) -> web.StreamResponse:
        body = parse_body(await self._body(http), http.headers.get("Content-Type", ""))
        request, options = to_request(body, chat, next(self._ids))
        job = await self.service.prepare(request, raw_prompt=not chat)
        reply = CompletionBuilder(chat, self.model_name, options.include_usage, options.stops, job.sampling.seed)
        cancel = Cancellation()
        async with contextlib.aclosing(self.service.run(job, cancel)) as items:
            first = await anext(items)  # overloaded raises here: still a plain HTTP error
            if not options.stream:
                item = first
                while not isinstance(item, Stats):
                    if isinstance(item, Error):
                        return await self._send_error(http, item.code, item.message)
                    reply.add(item)
                    if reply.stopped:
                        cancel.set()
                    item = await anext(items)
                reply.add(item)
                return await self._send_json(http, reply.whole())
            return await self._stream(http, first, items, reply, cancel)

    async def _stream(self, http, item, items, reply: CompletionBuilder, cancel: Cancellation) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await self._write(http, response.prepare(http))
            while True:
                if isinstance(item, Error):  # mid-stream: the openai package raises on an "error" event
                    await self._event(http, response, error_body(item.code, item.message))
                    break
                for event in reply.events(item):
                    await self._event(http, response, event)
                if reply.stopped:
                    cancel.set()
                if isinstance(item, Stats):
                    break
                item = await anext(items)
            await self._write(http, response.write(b"data: [DONE]\n\n"))
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the client left or stopped reading: closing `items` cancels the request and frees its engine
        return response

    async def _event(self, http, response: web.StreamResponse, data: dict) -> None:
        await self._write(http, response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"))

    async def _write(self, http: web.BaseRequest, writing) -> None:
        """Await one write, at most write_timeout seconds; past that the connection is
        dropped (TimeoutError), as a client that does not read would hold it forever."""
        try:
            await asyncio.wait_for(writing, self.config.write_timeout)
        except asyncio.TimeoutError:
            if http.transport is not None:
                http.transport.abort()
            raise

    async def _send_json(self, http: web.BaseRequest, data: dict, status: int = 200) -> web.StreamResponse:
        response = web.json_response(data, status=status)
        if status == 408:
            response.force_close()  # the rest of the request is not coming in time: the connection ends
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await self._write(http, response.prepare(http))
            await self._write(http, response.write_eof())
        return response

    async def _send_error(self, http: web.BaseRequest, code: str, message: str) -> web.StreamResponse:
        if code == ErrorCode.INTERNAL:
            message = INTERNAL_MESSAGE  # the details are in the log already
        return await self._send_json(http, error_body(code, message), STATUS.get(code, 400))

    async def _guarded(self, http: web.BaseRequest) -> web.StreamResponse:
        """handle() with a last resort: a bug answers 500 with generic text, details logged."""
        try:
            return await self.handle(http)
        except Exception:
            log.exception("HTTP %s %s failed", http.method, http.path[:80])
            return await self._send_error(http, ErrorCode.INTERNAL, INTERNAL_MESSAGE)

"""OpenAI-compatible HTTP endpoint (aiohttp) on the same Service as the native server:
GET /v1/models, POST /v1/chat/completions and /v1/completions, streamed as server-sent
events when "stream" is true, so tools built on the OpenAI API work unchanged.

Requests map onto runtime.serving.protocol.Request and go through the same checks and queue as
native ones. Leapfrog's own options ride along as extra fields: "mode" and "top_k" (the
openai package sends them with extra_body). Errors come back in OpenAI's shape,
{"error": {"message", "type", "code", "param"}}, with the native error code as "code".
Not supported (a clear 400): n > 1, stop sequences, logprobs, tools.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid

from aiohttp import web

from runtime.serving.protocol import Chunk, Error, ErrorCode, ProtocolError, Request, Stats, from_dict
from runtime.serving.service import Cancellation, Service

STATUS = {ErrorCode.OVERLOADED: 429, ErrorCode.INTERNAL: 500}  # anything else: 400
UNSUPPORTED = ("stop", "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "suffix", "echo", "best_of", "logit_bias")
IGNORED = ("model", "user", "stream_options", "frequency_penalty", "presence_penalty", "n", "metadata")


def error_response(code: str, message: str) -> web.Response:
    kind = "server_error" if code == ErrorCode.INTERNAL else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    return web.json_response(body, status=STATUS.get(code, 400))


class OpenAIApi:
    def __init__(self, service: Service, model_name: str):
        self.service = service
        self.model_name = model_name
        self._ids = itertools.count(1)
        self.app = web.Application(client_max_size=service.config.server.max_frame_bytes)
        self.app.add_routes([
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
        ])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        # handler_cancellation: a client that hangs up cancels its handler, which closes
        # the request's stream and so stops its decode (non-streaming requests too).
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def models(self, _: web.Request) -> web.Response:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "leapfrog"}
        return web.json_response({"object": "list", "data": [model]})

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        return await self._complete(http, chat=True)

    async def completions(self, http: web.Request) -> web.StreamResponse:
        return await self._complete(http, chat=False)

    # ----------------------------------------------------------------------- requests

    def _request(self, body, chat: bool) -> Request:
        """The JSON body -> a native Request (every field type checked by from_dict)."""
        if not isinstance(body, dict):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "the body must be a JSON object")
        for key in UNSUPPORTED:
            if body.get(key) not in (None, [], False):
                raise ProtocolError(ErrorCode.INVALID_FIELD, f"{key!r} is not supported by this server")
        if body.get("n", 1) != 1:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "only n = 1 is supported")
        fields = {k: v for k, v in body.items() if k not in IGNORED and k not in UNSUPPORTED and k != "stream"}
        fields["max_new_tokens"] = fields.pop("max_completion_tokens", fields.pop("max_tokens", None))
        fields.pop("max_tokens", None)
        if chat:
            fields["messages"] = _plain_messages(fields.get("messages"))
        else:
            prompt = fields.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                fields["prompt"] = prompt[0]  # a batch of one
        fields.pop("type", None)
        fields.pop("id", None)
        return from_dict({"type": "request", "id": next(self._ids), **fields})

    async def _complete(self, http: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error_response(ErrorCode.MALFORMED_FRAME, f"the body is not JSON: {e}")
        try:
            request = self._request(body, chat)
            job = await self.service.prepare(request, raw_prompt=not chat)
        except ProtocolError as e:
            return error_response(e.code, e.message)
        stream = body.get("stream") is True
        reply = CompletionBuilder(chat, self.model_name, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        cancel = Cancellation()
        items = self.service.run(job, cancel)
        if not stream:
            async with contextlib.aclosing(items):
                try:
                    async for item in items:
                        if isinstance(item, Error):
                            return error_response(item.code, item.message)
                        reply.add(item)
                except ProtocolError as e:
                    return error_response(e.code, e.message)
            return web.json_response(reply.whole())
        return await self._stream(http, items, reply)

    async def _stream(self, http: web.Request, items, reply: CompletionBuilder) -> web.StreamResponse:
        async with contextlib.aclosing(items):
            try:
                first = await anext(items)
            except ProtocolError as e:  # overloaded: still a plain HTTP error
                return error_response(e.code, e.message)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(http)
            try:
                item = first
                while True:
                    if isinstance(item, Error):  # mid-stream: the openai package raises on an "error" event
                        await _event(response, {"error": {"message": item.message, "type": "server_error", "code": item.code}})
                        break
                    for event in reply.events(item):
                        await _event(response, event)
                    if isinstance(item, Stats):
                        break
                    item = await anext(items)
                await response.write(b"data: [DONE]\n\n")
            except (ConnectionError, StopAsyncIteration):
                pass  # the client left: closing `items` cancels the request and frees its engine
        return response


async def _event(response: web.StreamResponse, data: dict) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


def _plain_messages(messages):
    """OpenAI content may be a list of parts; text parts are joined, anything else is refused."""
    if not isinstance(messages, list):
        return messages  # from_dict reports the type error
    plain = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
                raise ProtocolError(ErrorCode.INVALID_FIELD, "only text content parts are supported")
            m = {**m, "content": "".join(p["text"] for p in parts)}
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if k != "name"}
        plain.append(m)
    return plain


class CompletionBuilder:
    """Builds the OpenAI response objects (a whole completion, or its stream of chunk
    events) from Chunks and the final Stats."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text: list[str] = []
        self.stats: Stats | None = None
        self._sent_role = False

    def add(self, item: Chunk | Stats) -> None:
        if isinstance(item, Chunk):
            self.text.append(item.text)
        else:
            self.stats = item

    def _usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.tokens, "total_tokens": s.prompt_tokens + s.tokens}

    def _leapfrog(self) -> dict:
        s = self.stats
        return {"mode": s.mode, "forward_passes": s.forward_passes, "tau": s.tau, "seconds": s.seconds,
                "ttft_seconds": s.ttft_seconds, "queue_seconds": s.queue_seconds}

    def _finish(self) -> str:
        return "length" if self.stats.finish_reason == "length" else "stop"

    def whole(self) -> dict:
        text = "".join(self.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self._finish(), "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": self._finish(), "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [choice], "usage": self._usage(), "leapfrog": self._leapfrog()}

    def _chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    def events(self, item: Chunk | Stats) -> list[dict]:
        """The SSE events for one item: a delta per Chunk with text; the finish (and usage) at the end."""
        self.add(item)
        if isinstance(item, Chunk):
            role, self._sent_role = self.chat and not self._sent_role, True
            return [self._chunk(item.text, None, role)] if item.text or role else []
        final = self._chunk(None, self._finish())
        final["leapfrog"] = self._leapfrog()
        events = [final]
        if self.include_usage:
            usage = self._chunk(None, None)
            usage["choices"], usage["usage"] = [], self._usage()
            events.append(usage)
        return events

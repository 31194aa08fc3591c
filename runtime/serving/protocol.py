"""The native wire protocol: length-prefixed msgpack frames over TCP.

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map;
the map's "type" says which message it is. Client -> server: Hello (the API key, first,
when the server has one), Request, Cancel. Server ->
client: Chunk (verified tokens as they are committed), Stats (ends a request), Error
(ends a request when it has an id; otherwise it is about the connection). One request
runs at a time on a connection; a client that wants several at once opens several
connections (runtime.serving.client keeps a pool).

Decoding is strict: every field has one type, unknown fields are errors, integers fit
in 64 bits, floats are finite, strings are valid UTF-8 (no lone surrogates either, which
JSON can carry), chat roles are known; each failure is a ProtocolError carrying one of
the ErrorCode values, which the server sends back in an Error frame. The OpenAI endpoint
turns its JSON into these messages too, so every value is checked here, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import struct
from dataclasses import dataclass

import msgpack

HEADER = struct.Struct(">I")


class ErrorCode:
    """Codes of Error frames (and of the OpenAI endpoint's errors)."""

    MALFORMED_FRAME = "malformed_frame"  # not one msgpack map, or no known "type"
    FRAME_TOO_LARGE = "frame_too_large"  # the connection is closed after this one
    INVALID_UTF8 = "invalid_utf8"
    INVALID_FIELD = "invalid_field"  # missing, unknown or wrongly typed field
    INVALID_SAMPLING = "invalid_sampling"
    INVALID_MAX_NEW_TOKENS = "invalid_max_new_tokens"
    UNKNOWN_MODE = "unknown_mode"
    PROMPT_TOO_LONG = "prompt_too_long"
    MODE_NOT_ALLOWED = "mode_not_allowed"  # a mode this server does not offer ([server] allowed_modes)
    REQUEST_IN_PROGRESS = "request_in_progress"  # a second request on a busy connection
    TOO_MANY_PENDING = "too_many_pending"  # the connection's unfinished requests are at their limit
    OVERLOADED = "overloaded"  # the wait queue is full
    TOO_MANY_CONNECTIONS = "too_many_connections"
    IDLE_TIMEOUT = "idle_timeout"
    REQUEST_TIMEOUT = "request_timeout"  # a request begun (or a connection opened) and not complete in time; closed
    UNAUTHORIZED = "unauthorized"  # no API key, or the wrong one; the connection is closed
    NOT_FOUND = "not_found"  # HTTP only: no such path
    PAYLOAD_TOO_LARGE = "payload_too_large"  # HTTP only: a body over max_frame_bytes
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # HTTP only: a body that is not application/json
    INTERNAL = "internal_error"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id: int | None = None):
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


# --------------------------------------------------------------------------- messages


ROLES = ("system", "user", "assistant")  # chat roles a request's messages may have
INT_RANGE = (-(2**63), 2**63)  # integers of every field: [low, high)


@dataclass
class Hello:
    api_key: str  # the server's [server] api_key; a server with none ignores it
    type: str = "hello"


@dataclass
class Request:
    id: int  # chosen by the client; echoed in every frame about this request
    prompt: str | None = None  # a user message (the chat template is applied) ...
    messages: list[dict] | None = None  # ... or chat messages [{"role", "content"}]
    mode: str | None = None  # decoding mode; None: the server's default
    max_new_tokens: int | None = None  # None: the server's default
    temperature: float | None = None  # sampling; None: the server's [sampling] value
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    type: str = "request"


@dataclass
class Cancel:
    id: int
    type: str = "cancel"


@dataclass
class Chunk:
    id: int
    text: str  # text delta (complete characters only)
    token_ids: list[int]  # tokens this step verified and committed
    forward_passes: int = 1  # target forward passes the step took
    type: str = "chunk"


@dataclass
class Stats:
    id: int
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    tokens: int  # generated tokens
    forward_passes: int
    tau: float  # tokens per target forward pass
    queue_seconds: float  # waiting for an engine
    ttft_seconds: float  # from the start of decoding to the first chunk (prefill included)
    seconds: float  # decoding, prefill included
    mode: str = ""
    # How its steps were batched with other requests' (runtime.batching.step_batcher.ReplyBatching):
    # steps that shared a pass, the mean steps of its passes, its mean rows a step (tree
    # size, which load-aware sizing shrinks under load)
    batched_steps: int = 0
    mean_pass_steps: float = 0.0
    mean_step_rows: float = 0.0
    seed: int = 0  # the sampling seed it used: the request's, or a fresh one when it sent none (send it back to reproduce)
    type: str = "stats"


@dataclass
class Error:
    code: str
    message: str
    id: int | None = None  # the request it ends; None: about the connection
    type: str = "error"


MESSAGES = {cls.type: cls for cls in (Hello, Request, Cancel, Chunk, Stats, Error)}
Message = Hello | Request | Cancel | Chunk | Stats | Error

# The Python types a field may hold, by its annotation (None is allowed for "| None").
_TYPES = {"int": (int,), "str": (str,), "float": (float, int), "list[int]": (list,), "list[dict]": (list,)}


def _valid_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT_RANGE[0] <= v < INT_RANGE[1]


def _valid_str(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON)
        raise ProtocolError(ErrorCode.INVALID_UTF8, "a string is not valid UTF-8") from None
    return True


def _valid_message(m) -> bool:
    if not (isinstance(m, dict) and set(m) == {"role", "content"} and _valid_str(m["role"]) and _valid_str(m["content"])):
        return False
    if m["role"] not in ROLES:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"unknown message role {m['role']!r:.40}; known: {', '.join(ROLES)}")
    return True


# How a value of each annotation is checked (None is allowed for "| None").
_VALID = {
    "int": _valid_int,
    "str": _valid_str,
    "float": lambda v: (isinstance(v, float) and math.isfinite(v)) or _valid_int(v),
    "list[int]": lambda v: isinstance(v, list) and all(_valid_int(x) for x in v),
    "list[dict]": lambda v: isinstance(v, list) and all(_valid_message(m) for m in v),
}


def _check_field(name: str, annotation: str, value) -> None:
    base = annotation.removesuffix(" | None")
    if value is None and annotation.endswith(" | None"):
        return
    if not _VALID[base](value):
        what = "a finite number" if base == "float" else f"{base} (integers in 64 bits)" if "int" in base else base
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"field {name!r} must be {what}, got {value!r:.80}")


def encode(message: Message) -> bytes:
    body = msgpack.packb(dataclasses.asdict(message), use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """One frame's body -> its message; ProtocolError when it is not a valid message."""
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except UnicodeDecodeError as e:
        raise ProtocolError(ErrorCode.INVALID_UTF8, f"a string is not valid UTF-8: {e}") from None
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"not a msgpack value: {type(e).__name__}: {e}") from None
    return from_dict(data)


def from_dict(data) -> Message:
    """A decoded map -> its message, every field checked (also used for the HTTP endpoint's JSON)."""
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"a frame must be a msgpack map, got {type(data).__name__}")
    cls = MESSAGES.get(data.get("type"))
    if cls is None:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"unknown frame type {data.get('type')!r:.40}; known: {', '.join(MESSAGES)}")
    request_id = data.get("id") if _valid_int(data.get("id")) else None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"unknown fields {sorted(map(str, unknown))} in a {cls.type} frame", request_id)
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"a {cls.type} frame needs fields {missing}", request_id)
    try:
        for name, value in data.items():
            _check_field(name, fields[name].type, value)
    except ProtocolError as e:
        e.request_id = request_id
        raise
    return cls(**data)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, timeout: float | None = None) -> bytes | None:
    """The next frame's body; None at a clean end of stream (between frames). A frame
    longer than max_bytes raises FRAME_TOO_LARGE before any of its body is read. With a
    `timeout`, the frame must be whole within that many seconds of its first byte
    (asyncio.TimeoutError); waiting for the first byte has no limit here."""
    first = await reader.read(1)
    if not first:
        return None

    async def rest() -> bytes:
        (length,) = HEADER.unpack(first + await reader.readexactly(HEADER.size - 1))
        if length > max_bytes:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes; the limit is {max_bytes}")
        return await reader.readexactly(length)

    return await asyncio.wait_for(rest(), timeout)

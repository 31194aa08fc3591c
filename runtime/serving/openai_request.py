"""An OpenAI request body -> a native Request (runtime.serving.protocol) plus the options
only HTTP has (stream, usage, stop), every value checked here or by protocol.from_dict.

The body must be `Content-Type: application/json` (so a web page cannot post to a server
on its visitor's loopback without a CORS preflight, which this server never grants), in
UTF-8, at most max_frame_bytes, valid JSON without NaN or Infinity. Unknown fields are
refused; the forms OpenAI clients send for "nothing" (`"n": null`, `"stop": ""`,
`"logit_bias": {}`, `"tools": []`, ...) mean the default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import accumulate

from runtime.serving.protocol import ErrorCode, ProtocolError, Request, from_dict

MAX_STOPS = 4  # as in the OpenAI API
MAX_STOP_CHARS = 256
# Fields accepted and ignored (model: there is one; the penalties only as 0, the default).
IGNORED = {"model": str, "user": str, "metadata": dict, "store": bool}
# Fields accepted only as their default ("nothing"), in any of the forms clients send it.
DEFAULT_ONLY = {
    "n": (None, 1), "logit_bias": (None, {}), "logprobs": (None, False), "top_logprobs": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
}
# OpenAI names -> native Request fields (the rest keep their names: temperature, top_p, seed, mode, top_k).
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
NATIVE = {"temperature", "top_p", "seed", "mode", "top_k"}
# A request is a few levels deep (body -> messages -> message); json.loads recurses once a
# level, so a deep body is refused before it is parsed: a RecursionError deep in the parser
# can fire in whatever a garbage collection finalizes there, outside any except clause.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def bad(message: str, code: str = ErrorCode.INVALID_FIELD) -> ProtocolError:
    return ProtocolError(code, message)


def parse_body(body: bytes, content_type: str) -> object:
    """The JSON value of a request body; ProtocolError for anything else."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/json":
        raise bad(f"the body must be application/json, got {media.strip()[:40]!r}", ErrorCode.UNSUPPORTED_MEDIA_TYPE)
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise bad("the body must be UTF-8 (charset=utf-8)", ErrorCode.INVALID_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the body is not valid UTF-8", ErrorCode.INVALID_UTF8) from None
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise bad(f"the body is nested more than {MAX_JSON_DEPTH} levels deep", ErrorCode.MALFORMED_FRAME)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, an integer of too many digits, NaN/Infinity
        raise bad(f"the body is not valid JSON: {str(e)[:100]}", ErrorCode.MALFORMED_FRAME) from None


def _nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text, brackets inside strings
    not counted (an unterminated string's brackets are: the body is invalid anyway)."""
    brackets = re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text))
    return max(accumulate(1 if bracket in "[{" else -1 for bracket in brackets), default=0)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


@dataclass
class HttpOptions:
    stream: bool = False
    include_usage: bool = False
    stops: list[str] = field(default_factory=list)


def to_request(body, chat: bool, request_id: int) -> tuple[Request, HttpOptions]:
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    body = dict(body)
    options = HttpOptions(stream=_optional(body.pop("stream", None), bool, "stream") or False)
    stream_options = _optional(body.pop("stream_options", None), dict, "stream_options") or {}
    if set(stream_options) - {"include_usage"}:
        raise bad("stream_options may only have include_usage")
    options.include_usage = _optional(stream_options.get("include_usage"), bool, "stream_options.include_usage") or False
    options.stops = _stops(body.pop("stop", None))
    for name, kind in IGNORED.items():
        _optional(body.pop(name, None), kind, name)
    for name, defaults in DEFAULT_ONLY.items():
        if name in body and not any(_same(body[name], d) for d in defaults):
            raise bad(f"{name!r} is supported only as its default ({defaults[-1]!r})")
        body.pop(name, None)
    fields = {"type": "request", "id": request_id}
    limits = {name: body[name] for name in RENAMED if body.get(name) is not None}
    if len(set(map(repr, limits.values()))) > 1:  # both given, differently: neither silently wins
        raise bad(f"'max_tokens' ({limits['max_tokens']!r:.40}) and 'max_completion_tokens' "
                  f"({limits['max_completion_tokens']!r:.40}) disagree; send one of them")
    for name in [n for n in body if n in RENAMED]:
        if body[name] is not None:
            fields[RENAMED[name]] = body[name]
        del body[name]
    if chat:
        fields["messages"] = _plain_messages(body.pop("messages", None))
    else:
        prompt = body.pop("prompt", None)
        fields["prompt"] = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt  # a batch of one
    for name in [n for n in body if n in NATIVE]:
        fields[name] = body.pop(name)
    if body:
        raise bad(f"unknown fields {sorted(body)[:5]}")
    return from_dict(fields), options


def _same(value, default) -> bool:
    """value is `default` in JSON's terms: 0 and 0.0 are one number, false is not 0."""
    if default is None or isinstance(default, bool):
        return value is default
    if isinstance(default, int):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default
    return type(value) is type(default) and value == default


def _optional(value, kind: type, name: str):
    if value is not None and (type(value) is not kind):
        raise bad(f"{name!r} must be {kind.__name__} or null")
    return value


def _stops(value) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string, a list of strings or null")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"'stop' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
    return [s for s in stops if s]


def _plain_messages(messages):
    """OpenAI content may be a list of parts; text parts are joined, anything else is refused.
    A message's "name" is dropped. from_dict checks the rest (roles, types)."""
    if not isinstance(messages, list):
        return messages  # from_dict reports the type error
    plain = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
                raise bad("only text content parts are supported")
            m = {**m, "content": "".join(p["text"] for p in parts)}
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if k != "name"}
        plain.append(m)
    return plain

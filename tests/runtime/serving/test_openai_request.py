"""Parsing an OpenAI request body (runtime/serving/openai_request.py): nesting depth is
checked before the JSON parser recurses into it."""

from __future__ import annotations

import json

import pytest

from runtime.serving.openai_request import MAX_JSON_DEPTH, parse_body
from runtime.serving.protocol import ErrorCode, ProtocolError


def nested(depth: int) -> bytes:
    return json.dumps({"model": "m", "metadata": {"x": "[" * 200 + "{"}, "pad": [[0]]}).encode()[:-1] \
        + b", \"deep\": " + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_a_body_as_deep_as_the_limit_parses():
    assert parse_body(nested(MAX_JSON_DEPTH), "application/json")["model"] == "m"


@pytest.mark.parametrize("body", [nested(MAX_JSON_DEPTH + 1), b"[" * 100_000, b"{\"a\":" * 50_000])
def test_a_deeper_body_is_refused_before_parsing(body):
    with pytest.raises(ProtocolError) as error:
        parse_body(body, "application/json")
    assert error.value.code == ErrorCode.MALFORMED_FRAME and "levels deep" in str(error.value)


def test_brackets_inside_strings_do_not_count():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "[{\\\"" * 1000}]}).encode()
    assert parse_body(body, "application/json")["messages"][0]["content"].startswith("[{")

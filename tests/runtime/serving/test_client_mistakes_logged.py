"""A client's mistakes are logged one line each, at info level, with its address; a fault
of the server keeps its traceback at error level (issue 40: every malformed HTTP message
logged aiohttp's "Error handling request" with a traceback, so an operator could not
tell an attack from a bug)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from serving import assert_healthy, connect, frame, receive, running_server

from runtime.serving.protocol import ErrorCode

BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'
START = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
MALFORMED = {
    "duplicate Content-Length": START + b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(BODY) + BODY,
    "invalid Content-Length": START + b"Content-Length: 12abc\r\n\r\n" + BODY,
    "Content-Length and Transfer-Encoding": START + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(BODY) + BODY,
    "too many headers": START + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
    "a 200 KB header line": START + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n",
}


def send_and_read(address, data: bytes) -> bytes:
    """A blocking client on a real socket: send it all, then read to the end."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


async def test_malformed_http_messages_are_one_info_line_each_and_a_typed_400(caplog):
    async with running_server(http=True) as (server, engines):
        with caplog.at_level(logging.DEBUG):
            for name, data in MALFORMED.items():
                answer = await asyncio.to_thread(send_and_read, server.http_address, data)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.split()[1] == b"400", (name, head)
                assert json.loads(body)["error"]["code"] == ErrorCode.MALFORMED_FRAME, name
        tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
        assert not tracebacks, [r.getMessage() for r in tracebacks]
        lines = [r.getMessage() for r in caplog.records if r.name == "leapfrog.serve" and "malformed HTTP" in r.getMessage()]
        assert len(lines) == len(MALFORMED) and all(r.levelno == logging.INFO for r in caplog.records if r.name == "leapfrog.serve")
        assert all("127.0.0.1" in line and "\n" not in line for line in lines)
        await assert_healthy(server, engines)


async def test_a_native_clients_mistakes_are_info_lines(caplog):
    async with running_server() as (server, engines):
        with caplog.at_level(logging.DEBUG):
            reader, writer = await connect(server)
            writer.write(frame(b"\xc1") + frame({"type": "request", "id": 1, "prompt": 5}))
            assert (await receive(reader)).code == ErrorCode.MALFORMED_FRAME
            assert (await receive(reader)).code == ErrorCode.INVALID_FIELD
            writer.close()
        records = [r for r in caplog.records if r.name == "leapfrog.serve"]
        assert len(records) == 2 and all(r.levelno == logging.INFO and not r.exc_info for r in records)
        assert all("127.0.0.1" in r.getMessage() for r in records)
        await assert_healthy(server, engines)


async def test_a_server_fault_keeps_its_traceback_at_error_level(caplog):
    async with running_server(http=True) as (server, engines):
        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        server.service.prepare = broken  # the request fails inside the server
        with caplog.at_level(logging.INFO):
            request = START + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY
            answer = await asyncio.to_thread(send_and_read, server.http_address, request)
        assert answer.startswith(b"HTTP/1.1 500")
        faults = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(faults) == 1 and faults[0].exc_info and "a bug" in str(faults[0].exc_info[1])

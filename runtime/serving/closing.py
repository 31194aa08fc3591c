"""Closing a connection so that its last answer arrives (a refusal, a timeout, an error
that ends the connection).

Closing a socket while the client's bytes sit unread, or before they arrive, makes the
kernel answer them with a TCP reset: a client still sending its request then fails with
"connection reset" or "broken pipe" and never reads the answer that was written for it.
So the server writes its answer, ends its side of the stream (the client reads the answer
and then end of file), and reads and drops whatever the client still sends, until the
client closes too or LINGER_SECONDS pass; only then does it close.
"""

from __future__ import annotations

import asyncio
import contextlib

LINGER_SECONDS = 2.0  # how long a connection being closed reads (and drops) the client's bytes


def end_writing(transport: asyncio.BaseTransport) -> None:
    """Send end of file after what is written (the socket stays open for reading)."""
    with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
        if not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()


def answer_and_linger(transport: asyncio.Transport, answer: bytes, linger: float = LINGER_SECONDS) -> None:
    """For a protocol that drops what it receives from now on and lets the transport close
    at the client's end of file: write `answer`, end writing, close after `linger` seconds
    at most."""
    if transport.is_closing():
        return
    transport.write(answer)
    end_writing(transport)
    asyncio.get_running_loop().call_later(linger, transport.close)


async def linger_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: float = LINGER_SECONDS) -> None:
    """For a stream whose answer is written: end writing, drop what the client still sends
    until its end of file (or `linger` seconds), then close."""
    end_writing(writer.transport)

    async def drop_until_eof() -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drop_until_eof(), linger)
    if not writer.is_closing():
        writer.close()

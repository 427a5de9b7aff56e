"""The relay's DATA encoder: a message's segments onto the upstream's wire.

Instead of aiosmtplib's ``SMTP.data``, whose line-ending normalisation and
dot-stuffing regexes cost ~1.5 ms per 50 KB message and hold the event loop
over a second for a 35 MB one (every other session waits), and which make
three copies of it. :func:`data_chunks` produces the very bytes aiosmtplib
would send, a chunk at a time from the tracker's segments (views into the
received message, never one joined copy); :func:`send_data` writes each chunk
once the transport has drained below its high-water mark, so a slow upstream
never gets the whole message queued in the transport's buffer (one more copy
of it in memory). What it needs from below aiosmtplib's public API is in
relay/aiosmtplib_adapter.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator, Sequence

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay.aiosmtplib_adapter import RawData
from relay.headers import Segment

_BARE_LINE_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))")  # aiosmtplib's LINE_ENDINGS_REGEX
DATA_CHUNK = 1 << 20


async def send_data(smtp: aiosmtplib.SMTP, content: Sequence[Segment], wait: float) -> SMTPResponse:
    """DATA, then ``content`` as :func:`data_chunks` encodes it, then the reply.

    Raises what ``SMTP.data`` raises (``SMTPDataError`` on a refusal).
    """
    start = await smtp.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    raw = RawData(smtp)
    # Wait for the reply from now on: aiosmtplib drops what arrives while no
    # reply is awaited, and the sleeps below let the loop run mid-upload.
    reply_task = raw.expect_reply(wait)
    try:
        await asyncio.sleep(0)  # the reader is now waiting
        for chunk in data_chunks(content):
            raw.write(chunk)
            await asyncio.sleep(0)  # let other sessions run between megabytes
            if not await raw.drained(reply_task):
                break  # the upstream answered (or timed out) before the end
        reply = await reply_task
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()  # what SMTP.data does: the connection is out of step
        raise
    finally:
        if reply_task.done() and not reply_task.cancelled():
            reply_task.exception()  # retrieved: never "exception was never retrieved"
        reply_task.cancel()
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


def data_chunks(content: Iterable[Segment], size: int = DATA_CHUNK) -> Iterator[bytes]:
    """The DATA content on the wire: the same bytes ``aiosmtplib`` sends for
    ``b"".join(content)``, made ``size`` bytes at a time from the segments.

    Lone CR and LF become CRLF (only when a block has one: three counts in C
    tell), a final CRLF is added if missing, a dot starting a line is doubled
    (RFC 5321 4.5.2), then the ``.`` line. Each block of at most ``size``
    bytes is copied out of its segment, normalised and stuffed on its own, so
    the whole message is never copied and no pass over it holds the event
    loop: ``\r\n.`` cannot overlap itself, so a boundary only needs the last
    two bytes sent before, and a block ending in CR keeps that CR for the next
    one (it may be the first half of a CRLF). Blocks smaller than ``size``
    (headers, a rewritten part) are gathered into one chunk.
    """
    before = b"\r\n"  # the last two bytes written; the content starts at a line start
    carry = b""  # a CR that ended the previous block
    sent = 0
    pending: list[bytes] = []
    pending_size = 0
    for block in _blocks(content, size):
        if carry:
            block, carry = carry + block, b""
        if block.endswith(b"\r"):
            block, carry = block[:-1], b"\r"
        if not block:
            continue
        out = _encode_block(block, before)
        before = (before + out)[-2:]
        sent += len(out)
        pending.append(out)
        pending_size += len(out)
        if pending_size >= size:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if carry:  # a lone CR at the very end: a line end of its own
        pending.append(b"\r\n")
        before, sent = b"\r\n", sent + 2
    if not sent or before != b"\r\n":
        pending.append(b"\r\n")
    pending.append(b".\r\n")
    yield b"".join(pending)


def _blocks(content: Iterable[Segment], size: int) -> Iterator[bytes]:
    """The bytes of ``content`` in order, at most ``size`` at a time."""
    for segment in content:
        if len(segment) <= size:
            yield bytes(segment) if isinstance(segment, memoryview) else segment
            continue
        view = memoryview(segment)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


def _encode_block(block: bytes, before: bytes) -> bytes:
    """One block (never ending in CR) normalised and dot-stuffed."""
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        block = _BARE_LINE_END.sub(b"\r\n", block)
    out = block.replace(b"\r\n.", b"\r\n..")
    if before.endswith(b"\r\n") and block.startswith(b"."):
        out = b"." + out
    return out

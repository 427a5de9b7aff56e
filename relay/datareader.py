"""The DATA reader of the relay's SMTP protocol (relay/smtp.py): one message
body, un-stuffed, from the client's stream.

aiosmtpd reads DATA line by line with a debug log call per line. :func:`read_data`
reads whatever the socket delivered (up to one receive buffer) and searches
it for the terminator in C. It keeps the rules of the stock reader: dot
un-stuffing, lines over 1001 octets (1000 + a transparency dot) get 500, and
only ``<CRLF>.<CRLF>`` ends DATA (a bare ``<LF>.<LF>`` or ``<CR>.<CR>`` is
message content, so SMTP smuggling payloads stay inside one message).
Past the size limit it answers 552 at once and discards the rest while
draining, instead of buffering it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

from relay.aiosmtpd_adapter import unread

TERMINATOR = b"\r\n.\r\n"
MAX_LINE = 1001 - 2  # octets before CRLF, counting a transparency dot (aiosmtpd's limit)


class DataTooLong(Exception):
    """A DATA line exceeded the line limit; reply 500 after draining."""


class DataTooBig(Exception):
    """The message passed the size limit; 552 was already sent."""


async def read_data(
    reader: asyncio.StreamReader,
    *,
    size_limit: int | None,
    on_too_big: Callable[[], Awaitable[None]] | None = None,
) -> bytes:
    """Read one DATA body, un-stuffed, from just after the ``354`` reply.

    Raises :class:`DataTooLong` or :class:`DataTooBig` once the terminator has
    been read (the stream is then positioned at the next command).
    """
    # The CRLF that ended the DATA command line also starts the terminator of
    # an empty message (".\r\n" at once): put it back so one search finds both.
    unread(reader, b"\r\n")
    content = io.BytesIO()  # see _bytes_of
    skip = 2  # that CRLF is not content (un-stuffing keeps a CRLF)
    received = 0
    meter = _LineMeter()
    unstuff = _Unstuffer()
    too_long = too_big = False
    while True:
        try:
            piece = await reader.readuntil(TERMINATOR)
            body = piece[:-3]  # keep the CRLF that ends the last line
            last = True
        except asyncio.LimitOverrunError as exc:
            piece = body = await reader.read(exc.consumed)
            last = False
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("connection closed during DATA") from exc
        received += len(body)
        if not (too_long or too_big):
            too_long = meter.too_long(body)
            too_big = size_limit is not None and received - 2 > size_limit
            if too_long or too_big:
                content = io.BytesIO()  # discard at once: no buffering of what we refuse
                if too_big and not too_long and on_too_big is not None:
                    await on_too_big()
            else:
                content.write(memoryview(unstuff.feed(body))[skip:])
                skip = 0
        if last:
            break
    if too_long:
        raise DataTooLong
    if too_big:
        raise DataTooBig
    return _bytes_of(content)


def _bytes_of(buffer: io.BytesIO) -> bytes:
    """The buffer's bytes without a copy of them.

    A list of chunks joined at the end holds the message twice (35 MB of
    chunks and the 35 MB result); a ``BytesIO`` grows one bytes object in
    place (``realloc``, which moves pages for a large block), and CPython's
    ``getvalue()`` hands over that very object, shrunk to size, when no view
    of the buffer exists. So the message is in memory once, plus at most
    1/8 of growth room while it arrives.
    """
    value = buffer.getvalue()
    buffer.close()
    return value


class _Unstuffer:
    """Un-stuffing (a line starting with a dot loses that dot, RFC 5321 4.5.2),
    chunk by chunk as DATA arrives.

    ``\r\n.`` cannot overlap itself, so its occurrences are those inside each
    chunk plus those straddling a boundary (the raw stream so far ends in
    ``\r\n`` or ``\r``): the result equals one ``replace`` over the joined
    message, without a pass over a 35 MB message that would hold the event
    loop (and the GIL) for tens of milliseconds, nor another copy of it.
    """

    def __init__(self) -> None:
        self.tail = b""  # the last two raw bytes seen

    def feed(self, chunk: bytes) -> bytes:
        tail = self.tail
        self.tail = (tail + chunk[-2:])[-2:]
        if tail.endswith(b"\r\n") and chunk.startswith(b"."):
            chunk = chunk[1:]
        elif tail.endswith(b"\r") and chunk.startswith(b"\n."):
            chunk = b"\n" + chunk[2:]
        return chunk.replace(b"\r\n.", b"\r\n")


class _LineMeter:
    """Line lengths across chunks, without splitting the message into lines.

    A CRLF may straddle two chunks: a chunk ending in CR is measured without
    it, and a following chunk starting with LF ends that line.
    """

    def __init__(self) -> None:
        self.current = 0  # octets of the unfinished line, without a trailing CR
        self.cr = False  # the last chunk ended with CR

    def too_long(self, chunk: bytes) -> bool:
        if self.cr and chunk.startswith(b"\n"):
            self.current, chunk = 0, chunk[1:]
        elif self.cr:
            self.current += 1  # that CR was content
        self.cr = chunk.endswith(b"\r")
        if self.cr:
            chunk = chunk[:-1]
        lines = chunk.split(b"\r\n")
        first = self.current + len(lines[0])
        self.current = len(lines[-1]) if len(lines) > 1 else first
        longest = max(first, max(map(len, lines[1:]), default=0))
        return longest > MAX_LINE

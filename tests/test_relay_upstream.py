"""relay/upstream.py's DATA: the very bytes aiosmtplib would have sent, with flow control."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st
from tracing import peak_allocated

from relay.headers import Segment
from relay.upstream import DATA_CHUNK, Reply, SmtpUpstream, data_chunks
from shared.config import Settings, parse_upstream

PIECES = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"..", b"\r\r\n", b"\n."]


def aiosmtplib_wire(content: bytes) -> bytes:
    """What ``aiosmtplib.SMTP.data`` writes after the 354 (protocol.py)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


def segments(content: bytes, cuts: list[int]) -> list[Segment]:
    """``content`` cut at ``cuts``, as views and bytes (as the tracker hands it over)."""
    view = memoryview(content)
    bounds = [0, *sorted(c % (len(content) + 1) for c in cuts), len(content)]
    out: list[Segment] = []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        out.append(view[start:end] if i % 2 else bytes(view[start:end]))
    return out


@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.lists(st.integers(0, 200), max_size=6),
    st.integers(1, 9),
)
def test_data_chunks_are_aiosmtplibs_bytes(parts: list[bytes], cuts: list[int], size: int) -> None:
    content = b"".join(parts)
    assert b"".join(data_chunks(segments(content, cuts), size)) == aiosmtplib_wire(content)


def test_a_clean_message_is_sent_in_chunks_without_a_copy_of_the_whole() -> None:
    content = b"Subject: x\r\n\r\n" + b".dot line\r\n" * 1000
    chunks = list(data_chunks([memoryview(content)], size=4096))
    assert len(chunks) == len(content) // 4096 + 1
    assert max(map(len, chunks)) <= 4096 * 2  # a block and its stuffing dots
    assert b"".join(chunks) == aiosmtplib_wire(content)


def test_small_segments_go_out_as_one_chunk() -> None:
    """Headers, a rewritten part and the rest of a small message: one write."""
    content = b"Subject: x\r\n\r\n<p>hi</p>\r\n.\r\n"
    chunks = list(data_chunks(segments(content, [5, 12, 20])))
    assert chunks == [aiosmtplib_wire(content)]


class _PausingUpstream(asyncio.Protocol):
    """A loopback SMTP server that stops reading after DATA until ``resume`` is
    set, then reads (and discards) the content and answers 250."""

    def __init__(self, resume: asyncio.Event) -> None:
        self.resume = resume
        self.tail = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 paused.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self.tail = (self.tail + data)[-5:]  # the content itself is dropped
            if self.tail == b"\r\n.\r\n":
                self.in_data = False
                self.transport.write(b"250 2.0.0 Ok\r\n")
            return
        for line in data.split(b"\r\n"):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.transport.write(b"250 paused.test\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                self.transport.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 Bye\r\n")
                self.transport.close()
            elif verb == b"DATA":
                self.transport.write(b"354 go on\r\n")
                self.in_data = True
                self.transport.pause_reading()
                asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        await self.resume.wait()
        self.transport.resume_reading()


def test_a_slow_upstream_never_gets_the_whole_message_buffered(
    make_settings: Callable[..., Settings],
) -> None:
    """DATA content waits for the transport to drain: while the upstream does not
    read, the relay holds a chunk or two, not a 20 MB copy in its send buffer."""
    content = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 1_300_000 + b"\r\n"

    async def go() -> tuple[Reply, int]:
        resume = asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _PausingUpstream(resume), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = SmtpUpstream(
            make_settings(upstream=f"smtp://127.0.0.1:{port}"),
            parse_upstream(f"smtp://127.0.0.1:{port}", Path(".")),
        )
        assert (await connection.mail("ann@example.com", [])).ok
        assert (await connection.rcpt("bob@example.net")).ok
        with peak_allocated() as peak:
            sending = asyncio.create_task(connection.data([memoryview(content)]))
            await asyncio.sleep(0.5)  # the kernel's buffers fill up; the relay must wait
            resume.set()
            reply = await sending
        await connection.close()
        server.close()
        return reply, peak[0]

    reply, peak = asyncio.run(go())
    assert reply.code == 250
    assert peak < 4 * DATA_CHUNK

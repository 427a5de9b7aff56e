"""relay/upstream.py and relay/datawriter.py: DATA (the very bytes aiosmtplib
would have sent, with flow control), and connections that are always closed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay import upstream
from relay.datawriter import DATA_CHUNK, data_chunks
from relay.headers import Segment
from relay.upstream import Reply, SmtpUpstream
from shared.config import Settings, parse_upstream
from tests.support.relaykit import RawClient, running_relay, sqlite_engine
from tests.support.tracing import peak_allocated
from tests.support.upstream import PASSWORD, USER

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


class Stalling:
    """An upstream that greets, reads EHLO and never answers. ``sessions[i]``:
    (EHLO read, relay closed its end) for the i-th connection."""

    def __init__(self) -> None:
        self.sessions: list[tuple[asyncio.Event, asyncio.Event]] = []
        self.arrived = asyncio.Condition()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ehlo, closed = asyncio.Event(), asyncio.Event()
        async with self.arrived:
            self.sessions.append((ehlo, closed))
            self.arrived.notify_all()
        writer.write(b"220 stalling.test ESMTP\r\n")
        await reader.readline()
        ehlo.set()
        await reader.read()  # b"" when the relay closes the connection
        closed.set()
        writer.close()

    async def session(self, index: int) -> tuple[asyncio.Event, asyncio.Event]:
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]


@contextlib.asynccontextmanager
async def stalling(
    make_settings: Callable[..., Settings], tls_pair: tuple[Path, Path]
) -> AsyncIterator[tuple[Stalling, Settings]]:
    stall = Stalling()
    server = await asyncio.start_server(stall.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cert, key = tls_pair
    settings = make_settings(
        upstream=f"smtp://127.0.0.1:{port}", smtp_port=0, smtps_port=0, tls_cert=cert,
        tls_key=key, upstream_timeout=60,
    )  # fmt: skip
    try:
        yield stall, settings
    finally:
        server.close()
        await server.wait_closed()


async def _closed(stall: Stalling, index: int) -> None:
    """Wait until the relay has closed connection ``index`` (not left to the GC)."""
    _, closed = await asyncio.wait_for(stall.session(index), 10)
    await asyncio.wait_for(closed.wait(), 10)


def test_a_probe_that_times_out_closes_its_connection(
    make_settings: Callable[..., Settings],
    tls_pair: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "PROBE_TIMEOUT", 0.2)

    async def scenario() -> None:
        async with stalling(make_settings, tls_pair) as (stall, settings):
            assert await upstream.probe(settings) is None
            await _closed(stall, 0)

    asyncio.run(scenario())


def test_a_client_leaving_while_the_relay_connects_upstream_closes_that_connection(
    make_settings: Callable[..., Settings],
    tls_pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "PROBE_TIMEOUT", 0.2)
    engine = sqlite_engine(tmp_path)
    auth = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE

    async def scenario() -> None:
        async with (
            stalling(make_settings, tls_pair) as (stall, settings),
            running_relay(settings, engine) as relay,  # session 0: the probe
        ):
            raw = await RawClient.connect(relay.ports["smtps"], ssl=context)
            await raw.command(b"EHLO client.test")
            raw.writer.write(auth + b"\r\n")  # passthrough: the relay connects upstream
            ehlo, _ = await asyncio.wait_for(stall.session(1), 10)
            await asyncio.wait_for(ehlo.wait(), 10)
            await raw.close()  # the client gives up while the upstream says nothing
            await _closed(stall, 1)

    asyncio.run(scenario())
    engine.dispose()

"""relay/upstream.py: the DATA encoding (the very bytes aiosmtplib would have
sent), and connections that are always closed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st
from relaykit import RawClient, running_relay, sqlite_engine
from upstream import PASSWORD, USER

from relay import upstream
from relay.upstream import data_chunks
from shared.config import Settings

PIECES = [b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"a", b"..", b"\r\r\n", b"\n."]


def aiosmtplib_wire(content: bytes) -> bytes:
    """What ``aiosmtplib.SMTP.data`` writes after the 354 (protocol.py)."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(1, 9))
def test_data_chunks_are_aiosmtplibs_bytes(parts: list[bytes], size: int) -> None:
    content = b"".join(parts)
    assert b"".join(data_chunks(content, size)) == aiosmtplib_wire(content)


def test_a_clean_message_is_sent_in_chunks_without_a_copy_of_the_whole() -> None:
    content = b"Subject: x\r\n\r\n" + b".dot line\r\n" * 1000
    chunks = list(data_chunks(content, size=4096))
    assert len(chunks) == len(content) // 4096 + 2
    assert b"".join(chunks) == aiosmtplib_wire(content)


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
        async with stalling(make_settings, tls_pair) as (stall, settings):
            async with running_relay(settings, engine) as relay:  # session 0: the probe
                raw = await RawClient.connect(relay.ports["smtps"], ssl=context)
                await raw.command(b"EHLO client.test")
                raw.writer.write(auth + b"\r\n")  # passthrough: the relay connects upstream
                ehlo, _ = await asyncio.wait_for(stall.session(1), 10)
                await asyncio.wait_for(ehlo.wait(), 10)
                await raw.close()  # the client gives up while the upstream says nothing
                await _closed(stall, 1)

    asyncio.run(scenario())
    engine.dispose()

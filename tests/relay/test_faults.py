"""Faults with real processes: ``trackrelay relay`` in a subprocess, the upstream broken on purpose.

The client always either keeps the message (a 4xx, so it retries) or has it
accepted by the upstream exactly once; the client's retry never delivers a
second copy. Slowloris clients cannot hold a session forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from tests.support.relaykit import SIMPLE, RawClient, RelayProcess
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def _start(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess], **env: str
) -> RelayProcess:
    """A relay with a plain port for 127.0.0.1 (no AUTH), logging in upstream as USER."""
    values = {
        "TRACKRELAY_UPSTREAM": upstream.url,
        "TRACKRELAY_UPSTREAM_VERIFY_TLS": "false",
        "TRACKRELAY_UPSTREAM_USER": USER,
        "TRACKRELAY_UPSTREAM_PASSWORD": PASSWORD,
        "TRACKRELAY_UPSTREAM_TIMEOUT": "10",
        "TRACKRELAY_TLS_CERT": str(upstream.cert),
        "TRACKRELAY_TLS_KEY": str(upstream.key),
        "TRACKRELAY_AUTH_MODE": "local",
        "TRACKRELAY_TRUSTED_NETWORKS": "127.0.0.1/32",
        "TRACKRELAY_PLAIN_PORT": "0",
        **env,
    }
    relay = RelayProcess(tmp_path, **values)
    processes.append(relay)
    return relay


async def _send(port: int, message: bytes = SIMPLE) -> tuple[int, str]:
    """One attempt, as a client would make it: (code, message) of the failing step or DATA."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        try:
            _, reply = await smtp.sendmail("app@example.com", ["bob@example.net"], message)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return 250, reply


def test_upstream_down_then_up_451_then_one_copy(
    tmp_path: Path,
    tls_pair: tuple[Path, Path],
    processes: list[RelayProcess],
) -> None:
    upstream = RecordingUpstream(*tls_pair).start()
    port = upstream.port
    upstream.stop()  # down: its port refuses connections
    relay = _start(tmp_path, upstream, processes)
    code, text = asyncio.run(_send(relay.plain))
    assert (code, text) == (451, "4.4.1 Upstream server unavailable, try again later")

    back = RecordingUpstream(*tls_pair, port=port).start()  # up again, same address
    try:
        code, text = asyncio.run(_send(relay.plain))  # the client's retry
        assert code == 250
        assert text.startswith("2.0.0 Ok: queued as 1")
        assert relay.stop() == 0
        assert [m.data for m in back.messages] == [SIMPLE]
    finally:
        back.stop()


def test_slow_upstream_answers_once(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    """Slower than the relay's idle timeout after the final dot: still one 250, one copy."""
    upstream.data_delay = 1.5
    relay = _start(tmp_path, upstream, processes, TRACKRELAY_IDLE_TIMEOUT="0.5")
    code, _ = asyncio.run(_send(relay.plain))
    assert code == 250
    assert relay.stop() == 0
    assert len(upstream.messages) == 1


def test_upstream_reset_mid_data_gives_4xx_and_the_retry_delivers_once(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    upstream.reset_mid_data = 1
    relay = _start(tmp_path, upstream, processes)
    first = asyncio.run(_send(relay.plain))
    assert first == (451, "4.4.1 Upstream server unavailable, try again later")
    assert upstream.messages == []
    second = asyncio.run(_send(relay.plain))
    assert second[0] == 250
    assert relay.stop() == 0
    assert [m.data for m in upstream.messages] == [SIMPLE]


def test_slowloris_data_is_cut_by_the_total_data_timeout(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    """A line every 0.2 s keeps the per-line idle timer (1 s) happy forever; the
    DATA timeout (1.5 s in all) ends it with 421, and nothing goes upstream."""
    relay = _start(
        tmp_path,
        upstream,
        processes,
        TRACKRELAY_IDLE_TIMEOUT="1",
        TRACKRELAY_DATA_TIMEOUT="1.5",
    )

    async def dribble() -> tuple[str, int]:
        raw = await RawClient.connect(relay.plain)
        for line in (b"EHLO slow.test", b"MAIL FROM:<app@example.com>", b"RCPT TO:<b@x.example>"):
            await raw.command(line)
        await raw.command(b"DATA")
        sent = 0
        try:
            while sent < 100:  # 20 s of dribbling if nothing stopped it
                raw.writer.write(b"X-Header-%d: slow\r\n" % sent)
                await raw.writer.drain()
                sent += 1
                await asyncio.sleep(0.2)
                if raw.reader.at_eof() or len(raw.reader._buffer):  # type: ignore[attr-defined]
                    break
        except ConnectionError:
            pass
        reply = await raw.reader.read()  # the 421, then the end of the connection
        await raw.close()
        return reply.decode(), sent

    reply, sent = asyncio.run(dribble())
    assert reply.startswith("421 4.4.2 "), reply
    assert sent < 100
    assert relay.stop() == 0
    assert upstream.messages == []


def test_an_idle_connection_is_closed(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    """Connected, greeted, then silent (or dribbling a command without its end)."""
    relay = _start(tmp_path, upstream, processes, TRACKRELAY_IDLE_TIMEOUT="0.5")

    async def silent(partial: bytes) -> bytes:
        raw = await RawClient.connect(relay.plain)
        raw.writer.write(partial)
        rest = await asyncio.wait_for(raw.reader.read(), 10)  # EOF: the relay hung up
        await raw.close()
        return rest

    # The 421 first (RFC 5321 3.8), then EOF: read() returning proves the connection ended.
    for partial in (b"", b"EHLO never-ending"):
        rest = asyncio.run(silent(partial))
        assert rest.startswith(b"421 4.4.2 "), rest
        assert rest.endswith(b" Timeout, closing transmission channel\r\n"), rest
    assert relay.stop() == 0

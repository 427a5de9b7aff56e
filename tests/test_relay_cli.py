"""`trackrelay relay` as users run it: a real process, stopped by signals."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from relaykit import SIMPLE, RawClient, RelayProcess
from upstream import PASSWORD, USER, RecordingUpstream


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.stop(signal.SIGKILL)


def test_relay_command_in_dev_mode(tmp_path: Path, processes: list[RelayProcess]) -> None:
    relay = RelayProcess(tmp_path, TRACKRELAY_AUTH_MODE="local")
    processes.append(relay)
    password = re.search(r"user: dev  password: (\S+)", "".join(relay.banner))
    assert password, relay.banner

    async def scenario() -> None:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.smtps, use_tls=True, validate_certs=False
        ) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain("dev", password[1])
            await smtp.sendmail("dev@example.com", ["rcpt@example.net"], SIMPLE)

    asyncio.run(scenario())
    assert relay.stop() == 0
    [delivered] = (tmp_path / "var" / "outbox" / "new").iterdir()
    assert delivered.read_bytes().endswith(SIMPLE)


def test_relay_killed_mid_transaction_loses_nothing_and_sends_once(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    env = {
        "TRACKRELAY_UPSTREAM": upstream.url,
        "TRACKRELAY_UPSTREAM_VERIFY_TLS": "false",
        "TRACKRELAY_TLS_CERT": str(upstream.cert),
        "TRACKRELAY_TLS_KEY": str(upstream.key),
    }
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    auth = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    wire = SIMPLE.replace(b"\r\n.", b"\r\n..")  # dot-stuffed, as clients send it

    async def transaction(port: int, kill: RelayProcess | None) -> str:
        raw = await RawClient.connect(port, ssl=context)
        for line in (b"EHLO client.test", auth, b"MAIL FROM:<alice@example.com>"):
            await raw.command(line)
        await raw.command(b"RCPT TO:<bob@example.net>")
        await raw.command(b"DATA")
        raw.writer.write(wire[:40])
        await raw.writer.drain()
        if kill is not None:
            await asyncio.to_thread(kill.stop, signal.SIGKILL)
            with pytest.raises(ConnectionError):
                await raw.command(wire[40:] + b".")
            return "killed"
        reply = await raw.command(wire[40:] + b".")
        await raw.close()
        return reply

    first = RelayProcess(tmp_path, **env)
    processes.append(first)
    assert asyncio.run(transaction(first.smtps, kill=first)) == "killed"
    assert upstream.messages == []
    second = RelayProcess(tmp_path, **env)  # the client retries on the restarted relay
    processes.append(second)
    assert asyncio.run(transaction(second.smtps, kill=None)).startswith("250 ")
    assert second.stop() == 0
    assert [m.data for m in upstream.messages] == [SIMPLE]

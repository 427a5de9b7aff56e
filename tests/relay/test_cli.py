"""`trackrelay relay` as users run it: a real process, stopped by signals."""

from __future__ import annotations

import asyncio
import base64
import gc
import re
import signal
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from tests.support.relaykit import SIMPLE, RawClient, RelayProcess
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


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
        # Closed also on the killed path: left open, its socket was reported by
        # the GC in some later test (how it ends depends on the kill's timing).
        async with await RawClient.connect(port, ssl=context) as raw:
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
            return await raw.command(wire[40:] + b".")

    first = RelayProcess(tmp_path, **env)
    processes.append(first)
    assert asyncio.run(transaction(first.smtps, kill=first)) == "killed"
    assert upstream.messages == []
    second = RelayProcess(tmp_path, **env)  # the client retries on the restarted relay
    processes.append(second)
    assert asyncio.run(transaction(second.smtps, kill=None)).startswith("250 ")
    assert second.stop() == 0
    assert [m.data for m in upstream.messages] == [SIMPLE]


def test_a_client_of_a_vanished_relay_is_closed(tls_pair: tuple[Path, Path]) -> None:
    """What the killed relay above does to its client, deterministically: the
    server's socket ends (FIN, no TLS close_notify) while the client waits for a
    reply. The client's TLS transport is then neither open nor closed; unless
    the client closes it, the garbage collector reports it later, in whatever
    test runs then (this is why the suite once ignored those reports)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*tls_pair)
    client_context = ssl.create_default_context()
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE

    async def vanish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 about to vanish\r\n")
        await reader.readline()
        writer.transport.abort()  # like a process killed: the kernel closes the socket

    async def scenario() -> None:
        server = await asyncio.start_server(vanish, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        async with await RawClient.connect(port, ssl=client_context) as raw:
            with pytest.raises(ConnectionError):
                await raw.command(b"EHLO client.test")
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
    gc.collect()  # an unclosed transport would be reported now, failing this test

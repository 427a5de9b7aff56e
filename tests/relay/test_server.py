"""Listeners, graceful shutdown and dev mode (relay/server.py, shared/devsetup.py)."""

from __future__ import annotations

import asyncio
from email import message_from_bytes
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import Engine

from relay.server import RelayServer
from tests.support.relaykit import (
    SIMPLE,
    MakeSettings,
    RawClient,
    client,
    relay_settings,
    running_relay,
    send,
)
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def test_graceful_shutdown_finishes_the_transaction_in_flight(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> tuple[str, str, str]:
        relay = RelayServer(relay_settings(make_settings, upstream), db_engine)
        await relay.start()
        idle = await RawClient.connect(relay.ports["smtp"])
        async with client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain(USER, PASSWORD)
            await smtp.mail(USER)
            await smtp.rcpt("bob@example.net")
            stopping = asyncio.create_task(relay.stop(grace=10))
            await asyncio.sleep(0.2)
            idle_reply = await idle.reply()  # an idle session is told at once
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", relay.ports["smtp"])
            reply = await smtp.data(SIMPLE)  # the busy one finishes its message
            with pytest.raises(aiosmtplib.SMTPServerDisconnected):
                await smtp.noop()
        await stopping
        await idle.close()
        return idle_reply, reply.message, str(stopping.done())

    idle_reply, reply, done = asyncio.run(scenario())
    assert idle_reply.startswith("421 4.3.2")
    assert reply.startswith("2.0.0")
    assert done == "True"
    assert len(upstream.messages) == 1


def test_plain_listener_serves_only_trusted_networks(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(make_settings, upstream, plain_port=0, trusted_networks="10.0.0.0/8")

    async def scenario() -> str:
        async with running_relay(settings, db_engine) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports["plain"])
            greeting = (await reader.readline()).decode()
            writer.close()
            return greeting

    assert asyncio.run(scenario()).startswith("554 5.7.1")


def test_trusted_network_sends_without_auth_on_the_plain_port(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(
        make_settings,
        upstream,
        plain_port=0,
        trusted_networks="127.0.0.0/8",
        upstream_user=USER,
        upstream_password=PASSWORD,
    )

    async def scenario() -> str:
        async with running_relay(settings, db_engine) as relay, client(relay, "plain") as smtp:
            ehlo = await smtp.ehlo()
            await smtp.sendmail("app@example.com", ["bob@example.net"], SIMPLE)
            return ehlo.message

    assert "AUTH" not in asyncio.run(scenario())
    assert upstream.messages[0].mail_from == "app@example.com"


def test_dev_mode_sink_self_signed_certificate_and_dev_user(
    make_settings: MakeSettings, tmp_path: Path, db_engine: Engine
) -> None:
    outbox = tmp_path / "outbox"
    settings = make_settings(upstream=f"maildir:{outbox}", smtp_port=0, smtps_port=0)

    async def scenario() -> tuple[list[str], list[str]]:
        async with running_relay(settings, db_engine) as relay:
            first = relay.describe()
            password = (settings.var_dir / "dev_password").read_text().strip()
            await send(relay, user="dev", password=password, sender="me@example.com",
                       recipients=("a@example.net", "b@example.net"))  # fmt: skip
        async with running_relay(settings, db_engine) as relay:
            return first, relay.describe()

    first, second = asyncio.run(scenario())
    password = (settings.var_dir / "dev_password").read_text().strip()
    assert any(password in line and "dev" in line for line in first)
    assert not any(password in line for line in second)
    assert any("self-signed" in line for line in first)
    assert (settings.var_dir / "tls" / "relay-cert.pem").exists()
    files = sorted((outbox / "new").iterdir())
    assert len(files) == 2
    assert not any((outbox / "tmp").iterdir())
    delivered = sorted(message_from_bytes(f.read_bytes())["Delivered-To"] for f in files)
    assert delivered == ["a@example.net", "b@example.net"]
    head = b"Return-Path: <me@example.com>\r\nDelivered-To: "
    assert all(f.read_bytes().startswith(head) and f.read_bytes().endswith(SIMPLE) for f in files)


def test_failed_tls_handshakes_are_not_sessions_to_wait_for(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Plain text on the implicit-TLS port (a scanner, a misconfigured client):
    the handshake fails and the connection is gone. It must not stay counted as
    a session, or the relay keeps it forever and every stop waits out the grace."""

    async def scenario() -> str:
        relay = RelayServer(relay_settings(make_settings, upstream), db_engine)
        await relay.start()
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports["smtps"])
            writer.write(b"EHLO plain.text.on.a.tls.port\r\n")
            await reader.read()  # the relay drops it
            writer.close()
            await writer.wait_closed()
        async with client(relay, "smtps") as smtp:  # a real session still works
            reply = await smtp.ehlo()
        await relay.stop(grace=30)
        return reply.message

    assert "AUTH" in asyncio.run(scenario())
    assert not [r for r in caplog.records if "still busy" in r.getMessage()]


async def _until_cut(raw: RawClient, commands: list[bytes]) -> list[str]:
    """Send ``commands`` round and round; the reply codes until the relay hangs up."""
    codes = []
    for n in range(1000):
        try:
            reply = await raw.command(commands[n % len(commands)])
        except ConnectionError:
            return codes
        codes.append(reply[:3])
        if reply.startswith("421"):
            assert "4.7.0 Too many commands without sending mail" in reply
    raise AssertionError("never cut off")


def test_a_client_looping_commands_that_send_no_mail_is_cut_off(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(make_settings, upstream, max_commands_without_mail=20)

    async def scenario() -> tuple[list[str], list[str]]:
        async with running_relay(settings, db_engine) as relay:
            async with await RawClient.connect(relay.ports["smtp"]) as raw:
                noops = await _until_cut(raw, [b"NOOP"])
            async with await RawClient.connect(relay.ports["smtp"]) as raw:
                # RSET, VRFY, HELP, a refused MAIL (no AUTH), a RCPT without MAIL
                mixed = [b"RSET", b"VRFY bob", b"HELP", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c>"]
                refused = await _until_cut(raw, [b"EHLO client.test", *mixed])
        return noops, refused

    noops, refused = asyncio.run(scenario())
    assert noops == ["250"] * 20 + ["421"]
    assert len(refused) == 21
    assert refused[-1] == "421"
    assert "530" in refused


def test_unknown_commands_are_cut_off_by_aiosmtpd(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> list[str]:
        async with (
            running_relay(relay_settings(make_settings, upstream), db_engine) as relay,
            await RawClient.connect(relay.ports["smtp"]) as raw,
        ):
            codes = []

            async def until_cut_off() -> None:
                for _ in range(100):
                    codes.append((await raw.command(b"XYZZY"))[:3])

            with pytest.raises(ConnectionError):
                await until_cut_off()
            return codes

    assert asyncio.run(scenario()) == ["500"] * 4 + ["502"]


def test_a_session_may_send_any_number_of_messages(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """A message restores the budget: with a limit of 6 (EHLO, STARTTLS, EHLO and
    AUTH take 4 of them), fifty messages each with a NOOP and an RSET in one
    session (PHPMailer's keep-alive sends RSET after every message)."""
    settings = relay_settings(make_settings, upstream, max_commands_without_mail=6)

    async def scenario() -> list[int]:
        codes = []
        async with running_relay(settings, db_engine) as relay, client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain(USER, PASSWORD)
            for n in range(50):
                await smtp.noop()
                await smtp.sendmail(USER, [f"r{n}@example.net"], SIMPLE)
                codes.append((await smtp.rset()).code)
        return codes

    assert asyncio.run(scenario()) == [250] * 50
    assert len(upstream.messages) == 50


def test_recipients_past_the_limit_are_free_only_up_to_the_overshoot(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RCPT refused past TRACKRELAY_MAX_RECIPIENTS costs no command, but only the
    first OVERSHOOT of a transaction: a client looping them is still cut off."""
    monkeypatch.setattr("relay.smtp.OVERSHOOT", 5)
    settings = relay_settings(
        make_settings,
        upstream,
        max_commands_without_mail=10,
        max_recipients=1,
        plain_port=0,
        trusted_networks="127.0.0.1/32",
        upstream_user=USER,
        upstream_password=PASSWORD,
    )

    async def scenario() -> list[str]:
        async with (
            running_relay(settings, db_engine) as relay,
            await RawClient.connect(relay.ports["plain"]) as raw,
        ):
            start = [
                (await raw.command(line))[:3]
                for line in (b"EHLO app.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@x>")
            ]
            return start + await _until_cut(raw, [b"RCPT TO:<c@x>"])

    codes = asyncio.run(scenario())
    # EHLO costs 1 of 10; 5 free 452s, then 9 counted ones; the next is refused
    assert codes == ["250", "250", "250"] + ["452"] * (5 + 9) + ["421"]

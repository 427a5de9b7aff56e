"""Bcc commands (relay/handler.py answers them, relay/policy.py decides with them)
through every listener: STARTTLS, implicit TLS, plain and the gateway.

A recipient at TRACKRELAY_COMMAND_DOMAIN gets 250, appears in no upstream
transaction (nor in any copy), and the decision says which command asked;
the policy's ceilings, suppressions and consent still win.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import Engine
from sqlmodel import select

from relay.server import RelayServer
from shared import consent, policies
from shared.config import Settings
from shared.db import session_scope
from shared.models import Message
from tests.support.relaykit import (
    MakeSettings,
    client,
    running_relay,
    signed_in,
    trusted_settings,
)
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

HTML = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Message-ID: <c1@example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://example.com/x">x</a></body></html>\r\n'
)
TRACK = "track@trackrelay.invalid"
LISTENERS = ("smtp", "smtps", "plain", "gateway")


@pytest.fixture
def back(tls_pair: tuple[Path, Path]) -> Iterator[RecordingUpstream]:
    """The gateway's return path."""
    server = RecordingUpstream(*tls_pair, require_auth=False).start()
    yield server
    server.stop()


def every_listener(
    make_settings: MakeSettings, upstream: RecordingUpstream, back: RecordingUpstream, **more: Any
) -> Settings:
    return trusted_settings(
        make_settings,
        upstream,
        gateway_port=0,
        gateway_networks="127.0.0.1/32",
        gateway_domains="example.com",
        gateway_upstream=back.url,
        **more,
    )


async def submit(
    relay: RelayServer, listener: str, recipients: list[str], message: bytes = HTML
) -> list[str]:
    """Send through ``listener`` (AUTH on the submission ones); the RCPT replies."""
    smtp = (
        aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=relay.ports["gateway"],
            start_tls=True,
            validate_certs=False,
            timeout=20,
        )
        if listener == "gateway"
        else client(relay, listener)
    )
    async with smtp:
        await smtp.ehlo()
        if listener in ("smtp", "smtps"):
            await smtp.auth_plain(USER, PASSWORD)
        await smtp.mail(USER)
        replies = []
        for rcpt in recipients:
            reply = await smtp.rcpt(rcpt)
            replies.append(f"{reply.code} {reply.message}")
        await smtp.data(message)
        return replies


def decisions(engine: Engine) -> dict[str, dict[str, Any]]:
    with session_scope(engine) as session:
        rows = session.exec(select(Message)).all()
        return {m.listener: json.loads(m.decision) for m in rows}


def test_a_bcc_command_is_obeyed_and_forwarded_nowhere_on_every_listener(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    back: RecordingUpstream,
    db_engine: Engine,
) -> None:
    settings = every_listener(make_settings, upstream, back)

    async def scenario() -> dict[str, list[str]]:
        async with running_relay(settings, db_engine) as relay:
            return {
                listener: await submit(relay, listener, ["bob@example.net", TRACK])
                for listener in LISTENERS
            }

    replies = asyncio.run(scenario())
    for listener, (bob, command) in replies.items():
        assert bob.startswith("250"), listener
        assert command.startswith("250 2.1.5"), (listener, command)
    received = upstream.messages + back.messages
    assert len(upstream.messages) == 3
    assert len(back.messages) == 1
    for message in received:
        assert message.rcpt_tos == ["bob@example.net"]
        assert b"https://example.com/x" not in message.data  # tracked, as asked
        assert TRACK.encode() not in message.data
    found = decisions(db_engine)
    assert sorted(found) == ["gateway", "implicit_tls", "plain", "submission"]
    for decision in found.values():
        assert decision["tracked"]
        assert f"Bcc command {TRACK}" in decision["reasons"]


def test_opens_and_clicks_commands_are_one_list_and_notrack_turns_always_off(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    back: RecordingUpstream,
    db_engine: Engine,
) -> None:
    policies.set_policy(db_engine, "carol@example.com", mode="always")
    settings = every_listener(make_settings, upstream, back)

    async def scenario() -> None:
        async with running_relay(settings, db_engine) as relay:
            await submit(relay, "smtp", ["bob@example.net", "opens@trackrelay.invalid"])
            await submit(
                relay,
                "smtp",
                ["bob@example.net", "Opens@TrackRelay.Invalid", "clicks@trackrelay.invalid"],
            )

    asyncio.run(scenario())
    opens_only, both = upstream.messages
    assert b"https://example.com/x" in opens_only.data  # opens@ alone: no clicks
    assert b"/o/" in opens_only.data
    assert b"https://example.com/x" not in both.data
    assert b"/o/" in both.data
    assert all(m.rcpt_tos == ["bob@example.net"] for m in upstream.messages)


def test_policy_ceilings_and_suppressions_still_win(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    back: RecordingUpstream,
    db_engine: Engine,
) -> None:
    policies.set_policy(db_engine, "@example.com", mode="header", allow_clicks=False)
    policies.add_suppression(db_engine, "dora@example.net")
    settings = every_listener(make_settings, upstream, back)

    async def scenario() -> None:
        async with running_relay(settings, db_engine) as relay:
            await submit(relay, "gateway", ["bob@example.net", TRACK])
            await submit(relay, "plain", ["dora@example.net", TRACK])

    asyncio.run(scenario())
    [capped] = back.messages
    assert b"https://example.com/x" in capped.data  # clicks not allowed: link untouched
    assert b"/o/" in capped.data
    [suppressed] = upstream.messages
    assert suppressed.data == HTML  # a suppressed recipient is never tracked
    with session_scope(db_engine) as session:
        reasons = [json.loads(m.decision) for m in session.exec(select(Message)).all()]
    assert any("clicks not allowed" in " ".join(r["reasons"]) for r in reasons)


def test_consent_still_wins_over_a_command(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    back: RecordingUpstream,
    db_engine: Engine,
) -> None:
    consent.set_mode(db_engine, "opt-in", "example.net")
    consent.add_consent(db_engine, "erin@example.net")
    settings = every_listener(make_settings, upstream, back)

    async def scenario() -> None:
        async with running_relay(settings, db_engine) as relay:
            await submit(relay, "smtps", ["bob@example.net", TRACK])
            await submit(relay, "smtps", ["erin@example.net", TRACK])

    asyncio.run(scenario())
    no_consent, consented = upstream.messages
    assert no_consent.data == HTML  # opt-in without consent: never tracked
    assert b"/o/" in consented.data


def test_an_unknown_command_is_refused_with_the_list_of_commands(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    back: RecordingUpstream,
    db_engine: Engine,
) -> None:
    settings = every_listener(make_settings, upstream, back)

    async def scenario() -> None:
        async with signed_in(settings, db_engine) as smtp:
            await smtp.mail(USER)
            await smtp.rcpt("trackme@trackrelay.invalid")

    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        asyncio.run(scenario())
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.1.1 <trackme@trackrelay.invalid>: not a trackrelay")
    assert "track@trackrelay.invalid, opens@trackrelay.invalid" in refused.value.message


def test_a_command_with_nothing_else_leaves_no_recipient_for_data(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    back: RecordingUpstream,
    db_engine: Engine,
) -> None:
    settings = every_listener(make_settings, upstream, back)

    async def scenario() -> str:
        async with signed_in(settings, db_engine) as smtp:
            await smtp.mail(USER)
            await smtp.rcpt(TRACK)
            data = await smtp.execute_command(b"DATA")
            return f"{data.code} {data.message}"

    assert asyncio.run(scenario()).startswith("503")
    assert upstream.messages == []

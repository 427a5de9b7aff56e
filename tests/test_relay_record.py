"""What the relay writes to the database (relay/record.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from relaykit import SIMPLE, client, relay_settings, running_relay, send
from sqlalchemy import Engine
from sqlmodel import Session, select
from upstream import PASSWORD, USER, RecordingUpstream

from shared import db
from shared.config import Settings
from shared.models import Message, Recipient
from shared.policies import add_suppression
from shared.tokens import Signer


async def send_three(settings: Settings, engine: Engine) -> str:
    async with running_relay(settings, engine) as relay:
        async with client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain(USER, PASSWORD)
            _, reply = await smtp.sendmail(
                USER, ["a@example.net", "gone@example.net", "b@example.net"], SIMPLE
            )
            return reply


def test_message_and_recipients_are_recorded(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    upstream.refuse["gone@example.net"] = "550 5.1.1 gone"
    reply = asyncio.run(send_three(relay_settings(make_settings, upstream), engine))
    with Session(engine) as session:
        [message] = session.exec(select(Message)).all()
        rows = session.exec(select(Recipient).order_by(Recipient.position)).all()
    assert (message.sender, message.auth_user, message.client_ip) == (USER, USER, "127.0.0.1")
    assert message.size_in == len(SIMPLE) and message.status == "partial"
    assert message.upstream_reply == f"250 {reply}"
    assert [(r.address, r.status, r.reply_code) for r in rows] == [
        ("a@example.net", "accepted", 250),
        ("b@example.net", "accepted", 250),
        ("gone@example.net", "refused", 550),
    ]
    assert rows[2].reply_text == "5.1.1 gone"


def test_database_failure_never_fails_the_client(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = db.make_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # never migrated
    with caplog.at_level(logging.ERROR, logger="relay.record"):
        reply = asyncio.run(send_three(relay_settings(make_settings, upstream), broken))
    assert reply.startswith("2.0.0")
    assert len(upstream.messages) == 1
    assert "DATABASE WRITE FAILED" in caplog.text


TRACKED = (
    b"From: alice@example.com\r\nTo: a@example.net, b@example.net\r\nSubject: hi\r\n"
    b"X-Track: all\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://example.com/x">x</a></body></html>\r\n'
)


def test_recipient_positions_match_the_tokens_when_one_is_untracked(
    make_settings: Callable[..., Settings], upstream: RecordingUpstream, engine: Engine
) -> None:
    """The untracked (suppressed) first recipient's copy goes out last; its row
    must still get position 1, or the second recipient's hits would be shown as
    the first recipient's."""
    settings = relay_settings(make_settings, upstream, public_url="https://t.example.net")
    add_suppression(engine, "a@example.net")

    async def scenario() -> None:
        async with running_relay(settings, engine) as relay:
            await send(relay, TRACKED, recipients=("a@example.net", "b@example.net"))

    asyncio.run(scenario())
    copies = {tuple(m.rcpt_tos): m.data for m in upstream.messages}
    assert copies[("a@example.net",)] == TRACKED.replace(b"X-Track: all\r\n", b"")
    token = re.search(rb"https://t\.example\.net/o/([\w-]+)\.gif", copies[("b@example.net",)])
    assert token
    position = Signer(settings.signing_keys()).verify_open(token[1].decode()).recipient
    with Session(engine) as session:
        rows = session.exec(select(Recipient).order_by(Recipient.position)).all()
    assert [(r.position, r.address, r.tracked) for r in rows] == [
        (1, "a@example.net", False),
        (2, "b@example.net", True),
    ]
    assert position == 2


def test_log_lines_name_the_message_as_the_dashboard_does(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One id per message across the relay's log lines (the tracking decision and
    the delivery), the same number the dashboard and API show, so grep finds both."""
    settings = relay_settings(make_settings, upstream, public_url="https://t.example.net")

    async def scenario() -> None:
        async with running_relay(settings, engine) as relay:
            await send(relay, TRACKED, recipients=("a@example.net",))
            await send(relay, SIMPLE, recipients=("a@example.net",))

    with caplog.at_level(logging.INFO, logger="relay"):
        asyncio.run(scenario())
    with Session(engine) as session:
        ids = [m.id for m in session.exec(select(Message)).all()]
    for mid in ids:
        names = {r.name for r in caplog.records if re.search(rf"message {mid}\b", r.getMessage())}
        assert names >= {"relay.track", "relay.record"}, (mid, caplog.text)

"""The sender's notification mail, delivered through the outbox to a real
aiosmtpd server on 127.0.0.1:0 (standing in for the upstream)."""

from __future__ import annotations

import asyncio
import email
import json
import socket
from collections.abc import Callable
from datetime import timedelta
from email.message import Message as EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import Engine, select

from shared import mailnotify
from shared.config import Settings
from shared.db import session_scope
from shared.models import OutboxItem, Policy
from shared.outbox import enqueue_for_events
from tests.shared.test_webhooks import running_worker, work_once
from tests.support.seedrows import add_message, event, write_events
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


class Sink:
    def __init__(self) -> None:
        self.mail: list[tuple[Envelope, EmailMessage]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.mail.append((envelope, email.message_from_bytes(envelope.content)))
        return "250 2.0.0 queued"


def queue(engine: Engine, events: list[dict[str, Any]]) -> int:
    write_events(engine, events)
    with session_scope(engine) as session:
        return enqueue_for_events(session, events, notify_email=True)


def test_first_open_and_first_click_mail_the_sender(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    with session_scope(engine) as session:
        session.add(Policy(pattern="@example.com", notify=True))
        session.add(Policy(pattern="quiet@example.com", notify=False))
    message = add_message(engine, sender="alice@example.com")
    quiet = add_message(engine, sender="quiet@example.com")
    t = message.created_at
    assert (
        queue(
            engine,
            [
                event(message, at=t + timedelta(minutes=1)),
                event(message, at=t + timedelta(minutes=2)),  # not the first open
                event(message, verdict="machine"),  # not a person
                event(message, kind="click", link=1, at=t + timedelta(minutes=3)),
                event(message, kind="click", link=1, at=t + timedelta(minutes=4)),  # not the first
                event(quiet),  # policy says no
            ],
        )
        == 2
    )
    sink = Sink()

    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(sink, hostname="upstream.test"), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        settings = make_settings(
            upstream=f"smtp://127.0.0.1:{port}", notify_from="trackrelay@example.com"
        )
        async with running_worker(settings, engine):
            deadline = asyncio.get_running_loop().time() + 10
            while len(sink.mail) < 2:
                assert asyncio.get_running_loop().time() < deadline, "no notification arrived"
                await asyncio.sleep(0.02)
        server.close()
        await server.wait_closed()

    asyncio.run(run())
    subjects = sorted(m["Subject"] for _, m in sink.mail)
    assert subjects == ["Clicked: Quarterly numbers", "Opened: Quarterly numbers"]
    for envelope, mail in sink.mail:
        assert envelope.mail_from == "trackrelay@example.com"
        assert envelope.rcpt_tos == ["alice@example.com"]
        assert mail["Auto-Submitted"] == "auto-generated"
        assert "bob@client.test" in mail.get_payload(decode=True).decode()
    with session_scope(engine) as session:
        statuses = session.exec(select(OutboxItem.status)).scalars().all()
    assert statuses == ["delivered", "delivered"]


def test_without_notify_from_the_row_fails_once_and_says_why(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    with session_scope(engine) as session:
        session.add(Policy(pattern="*", notify=True))
    queue(engine, [event(add_message(engine))])

    work_once(make_settings(), engine)
    with session_scope(engine) as session:
        (row,) = session.exec(select(OutboxItem)).scalars().all()
    assert row.status == "failed"
    assert "TRACKRELAY_NOTIFY_FROM" in row.last_error


def test_dev_mode_writes_the_notification_to_the_maildir_sink(
    engine: Engine, make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    with session_scope(engine) as session:
        session.add(Policy(pattern="alice@example.com", notify=True))
    queue(engine, [event(add_message(engine))])
    settings = make_settings(upstream=f"maildir:{tmp_path / 'sink'}", notify_from="tr@example.com")

    work_once(settings, engine)
    files = list((tmp_path / "sink" / "new").iterdir())
    assert len(files) == 1
    assert b"Opened: Quarterly numbers" in files[0].read_bytes()


def _payload() -> str:
    data = {"message": {"subject": "Quarterly numbers"}, "recipient": {"address": "bob@x.test"}}
    return json.dumps({"id": "evt-1", "data": data})


@pytest.mark.parametrize(("password", "delivered"), [(PASSWORD, True), ("not it", False)])
def test_the_relay_account_logs_in_once_through_tls(
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    password: str,
    delivered: bool,
) -> None:
    """One AUTH attempt (aiosmtplib.send(username=...) tried every mechanism
    offered, PLAIN then LOGIN, against the relay's real account)."""
    settings = make_settings(
        upstream=upstream.url,  # STARTTLS: the recording upstream refuses AUTH without it
        upstream_user=USER,
        upstream_password=password,
        upstream_verify_tls=False,
        notify_from="trackrelay@example.com",
    )
    send = mailnotify.send(settings, "alice@example.com", "message.opened", _payload())
    if delivered:
        assert asyncio.run(send) == 250
        (received,) = upstream.messages
        assert received.mail_from == "trackrelay@example.com"
        assert received.rcpt_tos == ["alice@example.com"]
    else:
        with pytest.raises(mailnotify.MailRefused) as refused:
            asyncio.run(send)
        assert refused.value.code == 535
        assert upstream.messages == []
    assert upstream.auth_attempts == [("PLAIN", USER)]


def test_an_unreachable_upstream_is_retryable(make_settings: Callable[..., Settings]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    settings = make_settings(upstream=f"smtp://127.0.0.1:{port}", notify_from="tr@example.com")
    with pytest.raises(mailnotify.MailError) as caught:
        asyncio.run(mailnotify.send(settings, "alice@example.com", "message.opened", _payload()))
    assert not isinstance(caught.value, mailnotify.MailRefused)


def test_a_reply_and_a_hard_bounce_mail_the_sender_a_soft_one_does_not(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    from relay.answerstore import AnswerStore, item
    from shared.answers import Finding

    with session_scope(engine) as session:
        session.add(Policy(pattern="@example.com", notify=True))
    message = add_message(engine, sender="alice@example.com")
    ids, at = (message.message_id_header,), message.created_at
    findings = [
        Finding("reply", "in-reply-to", ids, "bob@client.test"),
        Finding("auto_reply", "precedence", ids, "bob@client.test"),
        Finding("bounce", "dsn-delayed", ids, "carol@other.test", "soft", "4.2.2"),
        Finding("bounce", "ndr-qmail", ids, "carol@other.test", "hard", "5.1.1", "no mailbox"),
    ]
    copies = [item(f"c{i}", at, [f]) for i, f in enumerate(findings)]
    AnswerStore(engine, notify_email=True).write(copies, replay=False)
    settings = make_settings(notify_from="t@example.com")
    with session_scope(engine) as session:
        rows = session.exec(select(OutboxItem).where(OutboxItem.channel == "email")).scalars()
        mails = {
            r.event_type: mailnotify.compose(settings, r.target, r.event_type, r.payload)
            for r in rows
        }
    assert sorted(mails) == ["message.bounced", "message.replied"]
    assert mails["message.replied"]["Subject"] == "Replied: Quarterly numbers"
    assert "bob@client.test replied" in mails["message.replied"].get_content()
    assert mails["message.bounced"]["Subject"] == "Bounced: Quarterly numbers"
    assert "5.1.1 no mailbox" in mails["message.bounced"].get_content()


def test_a_broken_mailbox_connection_mails_its_address(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    """Queued with the break (shared/mailbox.py mark_broken), once, and said plainly."""
    from shared.outbox import enqueue_mailbox_disconnected

    settings = make_settings(notify_from="relay@example.com", public_url="https://t.example")
    connection = {
        "id": 4,
        "address": "ann@example.com",
        "provider": "microsoft",
        "user": "ann",
        "reason": "the provider no longer accepts the grant (invalid_grant: revoked)",
        "broken_at": "2026-01-02T03:04:05Z",
    }
    with session_scope(engine) as session:
        assert enqueue_mailbox_disconnected(session, connection, notify_email=True) == 1
        assert enqueue_mailbox_disconnected(session, connection, notify_email=True) == 0
        assert enqueue_mailbox_disconnected(session, {**connection, "id": 5}) == 0  # no mail
    with session_scope(engine) as session:
        [row] = session.execute(select(OutboxItem)).scalars().all()
    assert (row.channel, row.target, row.event_type) == (
        "email",
        "ann@example.com",
        "mailbox.disconnected",
    )
    mail = mailnotify.compose(settings, row.target, row.event_type, row.payload)
    assert mail["Subject"] == "Reconnect your mailbox: ann@example.com"
    body = mail.get_content()
    assert "Your mailbox connection for ann@example.com stopped working: the provider" in body
    assert "https://t.example/dashboard/mailbox" in body
    assert mail["X-Trackrelay-Idempotency-Key"] == row.idempotency_key

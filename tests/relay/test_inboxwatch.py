"""Replies and bounces from a connected mailbox's INBOX, over IMAP, in a real Dovecot.

The relay sends a tracked message to three recipients through the provider
(the recording upstream, OAuth only); a reply from one and a bounce for
another are then placed in ann's INBOX in Dovecot. The relay's INBOX watcher
(relay/inboxwatch.py, logged in with XOAUTH2 and ann's grant) finds them,
the classifier names them, and they are stored as events on the message; the
messages in the INBOX stay unseen.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from imapclient import IMAPClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from receiver.readmodel.events import events_after
from relay import inboxwatch
from shared.identity import Viewer
from shared.models import MailboxConnection, Message, User
from tests.support.dovecot import ANN, Dovecot
from tests.support.imapkit import BOUNCE, RECIPIENTS, REPLY, AnnsMailbox
from tests.support.relaykit import running_relay


def answers(engine: Engine) -> list[tuple[str, str]]:
    """(kind, recipient address) of the answers ann sees on her message (the read model
    the dashboard and /api/v1/events present)."""
    with Session(engine) as session:
        ann = session.exec(select(User).where(User.username == "ann")).one()
        message = session.exec(select(Message)).one()
    assert ann.id is not None
    viewer = Viewer(ann.id, "ann", ann.role, (ANN,))
    rows = events_after(engine, viewer, 0, 100)
    return sorted(
        (r.event.kind, r.address)
        for r in rows
        if r.event.kind in ("reply", "bounce") and r.event.message_id == message.id
    )


async def wait_for(engine: Engine, count: int, timeout: float = 20.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    found = await asyncio.to_thread(answers, engine)
    while len(found) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        found = await asyncio.to_thread(answers, engine)
    return found


async def watched(engine: Engine, timeout: float = 20.0) -> None:
    """The watcher has looked at the INBOX (it stored its UIDVALIDITY)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(engine) as session:
            row = session.exec(select(MailboxConnection)).one()
        if row.inbox_uidvalidity:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the INBOX watcher never looked")


def test_a_reply_and_a_bounce_become_events_and_stay_unseen(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    engine: Engine,
) -> None:
    with anns_mailbox.sent(engine) as sent:
        assert sent.reply.startswith("2.0.0")

        async def scenario() -> list[tuple[str, str]]:
            async with running_relay(sent.settings, engine):
                await watched(engine)
                await asyncio.to_thread(dovecot.append, "INBOX", REPLY)
                await asyncio.to_thread(dovecot.append, "INBOX", BOUNCE)
                return await wait_for(engine, 2)

        found = asyncio.run(scenario())
    assert found == [("bounce", RECIPIENTS[1]), ("reply", RECIPIENTS[0])]
    inbox = dovecot.messages("INBOX")
    assert [data for data, _ in inbox] == [REPLY, BOUNCE]
    assert all(b"\\Seen" not in flags for _, flags in inbox)  # nothing marked read
    with Session(engine) as session:
        row = session.exec(select(MailboxConnection)).one()
    assert row.inbox_last_uid == 2  # where it left off


def test_the_watcher_reconnects_and_goes_on_from_the_stored_uid(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    with anns_mailbox.sent(db_engine) as sent:
        assert sent.reply.startswith("2.0.0")

        async def scenario() -> list[tuple[str, str]]:
            async with running_relay(sent.settings, db_engine):
                await watched(db_engine)
                await asyncio.to_thread(dovecot.append, "INBOX", REPLY)
                assert await wait_for(db_engine, 1) == [("reply", RECIPIENTS[0])]
                await asyncio.to_thread(dovecot.stop)  # the server goes away under IDLE
                await asyncio.to_thread(dovecot.start)
                await asyncio.to_thread(dovecot.append, "INBOX", BOUNCE)
                return await wait_for(db_engine, 2)

        found = asyncio.run(scenario())
    assert found == [("bounce", RECIPIENTS[1]), ("reply", RECIPIENTS[0])]  # the reply once
    with Session(db_engine) as session:
        assert session.exec(select(MailboxConnection)).one().inbox_last_uid == 2


def test_a_server_without_idle_is_polled(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    dovecot.stop()
    dovecot.capabilities = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE UIDPLUS SPECIAL-USE"
    dovecot.start()
    with dovecot.client() as imap:
        assert b"IDLE" not in imap.capabilities()
    with anns_mailbox.sent(db_engine, imap_poll_interval=0.2) as sent:
        assert sent.reply.startswith("2.0.0")

        async def scenario() -> list[tuple[str, str]]:
            async with running_relay(sent.settings, db_engine) as relay:
                await watched(db_engine)
                assert any("over IMAP from 1 connected" in line for line in relay.describe())
                await asyncio.to_thread(dovecot.append, "INBOX", BOUNCE)
                return await wait_for(db_engine, 1)

        found = asyncio.run(scenario())
    assert found == [("bounce", RECIPIENTS[1])]
    assert all(b"\\Seen" not in flags for _, flags in dovecot.messages("INBOX"))


@pytest.mark.parametrize("expunge", [False, True], ids=["one-more", "one-gone-one-come"])
def test_a_message_announced_before_idle_is_read_at_once(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    expunge: bool,
) -> None:
    """A reply that arrives after the SEARCH and is announced (EXISTS) before IDLE begins
    (here by a NOOP, as by a FETCH) is not announced again under IDLE: it is read at
    once, not after the poll interval or an IDLE renewal (an hour each, here). Also
    when the bounce read before was expunged meanwhile (EXPUNGE, then the same EXISTS
    count as before)."""
    read = inboxwatch._Watch.read
    arrived = threading.Event()

    def read_then_a_reply(self: inboxwatch._Watch, client: IMAPClient, *args: int) -> int:
        last = read(self, client, *args)
        if last and not arrived.is_set():  # the bounce read: the reply comes
            arrived.set()
            with dovecot.client() as imap:
                imap.select_folder("INBOX")
                if expunge:
                    imap.delete_messages([last])
                    imap.uid_expunge([last])
                imap.append("INBOX", REPLY)
            client.noop()  # the server announces it now, before the watcher's IDLE
        return last

    with anns_mailbox.sent(db_engine, imap_poll_interval=3600.0, imap_idle_timeout=3600.0) as sent:
        assert sent.reply.startswith("2.0.0")
        dovecot.append("INBOX", BOUNCE)
        monkeypatch.setattr(inboxwatch._Watch, "read", read_then_a_reply)

        async def scenario() -> list[tuple[str, str]]:
            async with running_relay(sent.settings, db_engine):
                return await wait_for(db_engine, 2)

        found = asyncio.run(scenario())
    assert arrived.is_set()
    assert found == [("bounce", RECIPIENTS[1]), ("reply", RECIPIENTS[0])]
    left = [data for data, _ in dovecot.messages("INBOX")]
    assert left == ([REPLY] if expunge else [BOUNCE, REPLY])

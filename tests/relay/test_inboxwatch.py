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
import logging
import threading
import time
from collections.abc import Callable

import pytest
from imapclient import IMAPClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from receiver.readmodel.events import events_after
from relay import inboxwatch
from shared.identity import Viewer
from shared.models import MailboxConnection, Message, User
from tests.support.dovecot import ANN, USER, Dovecot
from tests.support.imapkit import (
    BOUNCE,
    RECIPIENTS,
    REPLY,
    AnnsMailbox,
    connect_ann,
    imap_provider,
)
from tests.support.oauth_server import OAuthServer
from tests.support.relaykit import MakeSettings, running_relay


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


async def wait_for(engine: Engine, count: int, timeout: float = 60.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    found = await asyncio.to_thread(answers, engine)
    while len(found) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        found = await asyncio.to_thread(answers, engine)
    return found


async def watched(engine: Engine, timeout: float = 60.0) -> None:
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


def test_an_app_password_connections_inbox_is_watched_over_login(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    """Provider fast takes app passwords only: ann sends as ann@ through the login alice
    (AUTH PLAIN), and alice's INBOX is watched with IMAP LOGIN."""
    with anns_mailbox.sent_with_a_password(db_engine, imap_poll_interval=0.5) as sent:
        assert sent.reply.startswith("2.0.0")

        async def scenario() -> list[tuple[str, str]]:
            async with running_relay(sent.settings, db_engine):
                await watched(db_engine)
                await asyncio.to_thread(dovecot.append, "INBOX", REPLY, user=USER)
                return await wait_for(db_engine, 1)

        found = asyncio.run(scenario())
    assert found == [("reply", RECIPIENTS[0])]
    assert f"user=<{USER}>, method=PLAIN" in dovecot.log()


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


def test_the_backoff_starts_again_after_a_session_that_ran_well(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    """Routine drops of a session that selected and read INBOX wait the first back-off
    each time; a server that stays away doubles it; once back, it starts again."""
    settings = make_settings(
        oauth=imap_provider(oauth_server, dovecot), imap_backoff_max=2.0, imap_poll_interval=0.5
    )
    connection = connect_ann(db_engine, settings, oauth_server)

    async def until(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, "the watch never got there"
            await asyncio.sleep(0.02)

    async def scenario() -> list[float]:
        watcher = inboxwatch.InboxWatcher(settings, db_engine, None)
        await watcher.start()
        try:
            watch = watcher.watches[connection]
            for drops in range(3):
                await until(lambda: watch.client is not None and watch.ran_well)
                assert watch.client is not None
                watch.client.shutdown()  # the server's idle timeout, say
                await until(lambda n=drops: len(watch.waits) == n + 1)  # type: ignore[misc]
            await until(lambda: watch.client is not None and watch.ran_well)
            await asyncio.to_thread(dovecot.stop)  # away for a while: it doubles
            await until(lambda: list(watch.waits)[-1] == 2.0)
            await asyncio.to_thread(dovecot.start)
            await until(lambda: watch.client is not None and watch.ran_well)
            count = len(watch.waits)
            watch.client.shutdown()
            await until(lambda: len(watch.waits) == count + 1)
            return list(watch.waits)
        finally:
            await watcher.stop()

    waits = asyncio.run(scenario())
    assert waits[:4] == [1.0, 1.0, 1.0, 1.0]  # three drops, then the server's going
    assert 2.0 in waits[4:-1]  # the reconnections while it was away
    assert waits[-1] == 1.0  # back: from the start again


def test_a_fresh_token_refused_ends_the_watch_and_says_why(
    make_settings: MakeSettings,
    oauth_server: OAuthServer,
    dovecot: Dovecot,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dovecot.stop()
    dovecot.scope = "https://outlook.office.com/IMAP.AccessAsUser.All"  # the grant has not
    dovecot.start()
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)

    async def scenario() -> None:
        watcher = inboxwatch.InboxWatcher(settings, db_engine, None)
        await watcher.start()
        try:
            await asyncio.to_thread(watcher.watches[connection].thread.join, 20)
            assert not watcher.watches[connection].thread.is_alive()  # ended, not retrying
        finally:
            await watcher.stop()

    with caplog.at_level(logging.WARNING, logger="relay.inboxwatch"):
        asyncio.run(scenario())
    assert f"INBOX of {ANN} not watched: the provider refused a fresh token" in caplog.text
    assert oauth_server.refreshes() == 1
    with Session(db_engine) as session:
        assert session.exec(select(MailboxConnection)).one().state == "broken"

"""A clean Sent folder after a tracked message left through a mailbox connection.

Real servers on loopback: the provider's submission server (the recording
upstream, OAuth only, tests/support/upstream.py) files what it accepts into
the sender's Sent folder in a real Dovecot (tests/support/dovecot.py) the way
Microsoft 365 does (every copy) or Gmail does (the first per Message-ID); the
relay logs in to Dovecot with XOAUTH2 and the connection's grant.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from imapclient import IMAPClient
from sqlalchemy import Engine, create_engine

from relay import sentfolder
from shared.config import Settings
from shared.tokens import Signer
from tests.support.dovecot import ANN, SENT, USER, Dovecot
from tests.support.dovecot import PASSWORD as DOVECOT_PASSWORD
from tests.support.imapkit import (
    MESSAGE,
    AnnsMailbox,
)
from tests.support.oauth_server import OAuthServer
from tests.support.relaykit import MakeSettings


def tracked(settings: Settings, data: bytes) -> bool:
    signer = Signer(settings.signing_keys())
    return any(
        sentfolder.kind(signer, mid, data) == sentfolder.TRACKED for mid in _ids(signer, data)
    )


def _ids(signer: Signer, data: bytes) -> set[int]:
    found = set()
    for letter, token in sentfolder._TOKEN.findall(data.decode("utf-8", "replace")):
        if letter == "o":
            found.add(signer.verify_open(token).message_id)
    return found


def assert_one_pristine_copy(settings: Settings, dovecot: Dovecot) -> None:
    sent = dovecot.messages(SENT)
    assert len(sent) == 1
    data, flags = sent[0]
    assert data == MESSAGE  # as the client sent it: all recipients, original link, no pixel
    assert b"\\Seen" in flags
    assert not tracked(settings, data)
    with dovecot.client() as imap:
        imap.select_folder(SENT, readonly=True)
        (uid,) = imap.search("ALL")
        internal = imap.fetch([uid], ["INTERNALDATE"])[uid][b"INTERNALDATE"]
    date = parsedate_to_datetime("Tue, 01 Dec 2026 09:30:00 +0000")
    assert internal == date.astimezone().replace(tzinfo=None)  # its own Date (local, naive)


@pytest.mark.parametrize("files", ["every", "first"], ids=["microsoft365", "gmail"])
def test_one_pristine_copy_is_left(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    engine: Engine,
    files: str,
) -> None:
    with anns_mailbox.sent(engine, files) as sent:
        assert sent.reply.startswith("2.0.0")
    assert len(sent.provider.messages) == 3  # one tracked copy per recipient
    assert all(tracked(sent.settings, m.data) for m in sent.provider.messages)
    assert_one_pristine_copy(sent.settings, dovecot)


def test_the_clients_own_copy_is_kept_and_none_added(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    # Thunderbird saves its own copy over IMAP (before the relay looks, here)
    dovecot.append(SENT, MESSAGE, flags=(b"\\Seen",))
    with anns_mailbox.sent(db_engine, "every") as sent:
        assert sent.reply.startswith("2.0.0")
    assert len(dovecot.messages(SENT)) == 1


def test_a_client_copy_saved_after_the_reply_is_the_one_kept(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    """Thunderbird saves its copy once it has the relay's 250, after the provider filed."""

    async def thunderbird(reply: str) -> None:
        assert reply.startswith("2.0.0")
        await asyncio.to_thread(dovecot.append, SENT, MESSAGE, (b"\\Seen",))

    with anns_mailbox.sent(db_engine, "every", after=thunderbird):
        pass  # sent: the provider stops
    assert len(dovecot.messages(SENT)) == 1


def test_nothing_else_is_touched(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    """Other mail in Sent, even with the same Message-ID or flagged deleted, stays."""
    other = MESSAGE.replace(b"<plan-1@example.com>", b"<other@example.com>")
    forged = b'<img src="https://t.example.com/o/AAAAAAAAAAAAAAAAAAAAAAAAAAAA.gif">'
    lookalike = MESSAGE.replace(b"the plan</a>", b"the plan</a> " + forged)
    dovecot.append(SENT, other, flags=(b"\\Seen", b"\\Deleted"))
    dovecot.append(SENT, lookalike, flags=(b"\\Seen",))
    with anns_mailbox.sent(db_engine, "every") as sent:
        assert sent.reply.startswith("2.0.0")
    left = [data for data, _ in dovecot.messages(SENT)]
    # the lookalike has no token of ours: it counts as the client's copy, none added
    assert left == [other, lookalike]


TRASH = {"sent_delete": "trash"}  # provider ``test`` as the google preset has it


@pytest.mark.parametrize(
    ("move", "files"), [(True, "first"), (False, "every")], ids=["move", "copy-expunge"]
)
def test_gmail_tracked_copies_are_deleted_through_trash(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
    move: bool,
    files: str,
) -> None:
    """Gmail: expunged in Sent, a copy stays in All Mail; moved to Trash and expunged
    there, it is gone. Only the copies moved there go: not the other mail in Trash
    (flagged deleted, or with the same Message-ID). The one copy Gmail files, with
    MOVE; three, with COPY and EXPUNGE where the server has no MOVE."""
    dovecot.stop()
    dovecot.trash = "Bin"  # found by its special-use flag, not its name
    if not move:
        dovecot.capabilities = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE UIDPLUS SPECIAL-USE"
    dovecot.start()
    with dovecot.client() as imap:
        assert (b"MOVE" in imap.capabilities()) is move
    other = MESSAGE.replace(b"<plan-1@example.com>", b"<other@example.com>")
    dovecot.append("Bin", other, flags=(b"\\Seen", b"\\Deleted"))
    dovecot.append("Bin", MESSAGE, flags=(b"\\Seen",))  # an earlier copy, thrown away
    with anns_mailbox.sent(db_engine, files, provider_options=TRASH) as sent:
        assert sent.reply.startswith("2.0.0")
    assert_one_pristine_copy(sent.settings, dovecot)
    # the tracked copies went through Trash (Dovecot's mail_log), the pristine one is added
    filed = 1 if files == "first" else 3
    plan = r"expunge: box={}, uid=\d+, msgid=<plan-1@example.com>"
    assert len(re.findall(plan.format("Sent"), dovecot.log())) == filed
    assert len(re.findall(plan.format("Bin"), dovecot.log())) == filed
    trash = [(data, set(flags)) for data, flags in dovecot.messages("Bin")]
    assert trash == [(other, {b"\\Seen", b"\\Deleted"}), (MESSAGE, {b"\\Seen"})]


def test_trash_without_a_trash_folder_removes_nothing(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server naming no \\Trash folder: the tracked copy stays where it is (a plain
    expunge would hide it from Sent and leave it in All Mail), and the log says why."""
    with anns_mailbox.sent(db_engine, "first", provider_options=TRASH) as sent:
        assert sent.reply.startswith("2.0.0")
    left = dovecot.messages(SENT)
    assert len(left) == 1
    assert tracked(sent.settings, left[0][0])  # the provider's copy, untouched
    assert b"\\Deleted" not in left[0][1]
    assert 'sent_delete = "trash", but the server names no \\Trash folder' in caplog.text


def test_sent_leave_keeps_what_the_provider_filed(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    with anns_mailbox.sent(db_engine, "every", sent="leave") as sent:
        assert sent.reply.startswith("2.0.0")
    assert len(dovecot.messages(SENT)) == 3


def test_only_a_verified_token_for_this_message_makes_a_copy_tracked(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings()
    signer = Signer(settings.signing_keys())
    ours = f"https://t.example.com/o/{signer.open_token(42, 1)}.gif".encode()
    click = f"https://t.example.com/c/{signer.click_token(42, 2, 1, 'https://x.org/')}".encode()
    other = f"https://t.example.com/o/{signer.open_token(43, 1)}.gif".encode()
    forged = b"https://t.example.com/o/" + b"A" * 40 + b".gif"
    body = MESSAGE.replace(b"the plan</a>", b"the plan</a> <img src='%s'>")
    assert sentfolder.kind(signer, 42, body % ours) == sentfolder.TRACKED
    assert sentfolder.kind(signer, 42, body % click) == sentfolder.TRACKED
    assert sentfolder.kind(signer, 42, body % other) == sentfolder.FOREIGN
    assert sentfolder.kind(signer, 42, body % forged) == sentfolder.PRISTINE
    assert sentfolder.kind(signer, 42, MESSAGE) == sentfolder.PRISTINE
    other_key = Signer([b"another secret key of 32 bytes!!"])
    assert sentfolder.kind(other_key, 42, body % ours) == sentfolder.PRISTINE


def test_a_token_in_quoted_printable_is_found(make_settings: MakeSettings) -> None:
    signer = Signer(make_settings().signing_keys())
    url = f"https://t.example.com/o/{signer.open_token(42, 1)}.gif".encode()
    html = b"<p>Hi</p><img src=3D'" + url[:30] + b"=\r\n" + url[30:] + b"'>\r\n"
    data = (
        b"Message-ID: <plan-1@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + html
    )
    assert sentfolder.kind(signer, 42, data) == sentfolder.TRACKED


def test_an_app_password_connection_gets_its_sent_folder_cleaned(
    anns_mailbox: AnnsMailbox,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    """Provider fast takes app passwords only: AUTH PLAIN to send (the recording upstream
    files the copies in alice's Sent, like Microsoft 365), IMAP LOGIN to clean."""
    with anns_mailbox.sent_with_a_password(
        db_engine, "every", imap_sent_window=1.0, imap_sent_interval=0.1, imap_poll_interval=0.5
    ) as sent:
        assert sent.reply.startswith("2.0.0")
    assert len(sent.provider.messages) == 3  # one tracked copy per recipient
    copies = dovecot.messages(SENT, user=USER)
    assert [data for data, _ in copies] == [MESSAGE]  # one pristine copy, as the client sent it
    assert f"user=<{USER}>, method=PLAIN" in dovecot.log()


# --- never a Sent folder without a copy; errors logged, never raised ---


def job_with_tracked_copies(
    settings: Settings, dovecot: Dovecot, original: bytes = MESSAGE, count: int = 2
) -> sentfolder.Job:
    """COUNT tracked copies of message 42 filed in ann's Sent, as the provider would."""
    signer = Signer(settings.signing_keys())
    for recipient in range(1, count + 1):
        pixel = f"<img src='https://t.example.com/o/{signer.open_token(42, recipient)}.gif'>"
        copy = MESSAGE.replace(b"the plan</a>", b"the plan</a> " + pixel.encode())
        dovecot.append(SENT, copy, flags=(b"\\Seen",))
    return sentfolder.Job(1, 42, "<plan-1@example.com>", original, count, ANN)


class DropsAfter(IMAPClient):
    """A real session whose connection is lost right after the command named."""

    after = "append"

    def append(self, *args: Any, **kwargs: Any) -> Any:
        result = super().append(*args, **kwargs)
        if self.after == "append":
            self.shutdown()
        return result


def sweep(client: IMAPClient, settings: Settings, job: sentfolder.Job) -> sentfolder.Outcome:
    client.select_folder(SENT)
    return sentfolder.sweep(client, SENT, settings, job, threading.Event())


def test_an_append_the_server_refuses_keeps_the_tracked_copies(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot
) -> None:
    dovecot.stop()
    dovecot.max_mail_size = "4k"  # the copies are smaller, the original is not
    dovecot.start()
    settings = make_settings(imap_sent_window=0.0, imap_sent_interval=0.1)
    large = MESSAGE + b"<p>" + b"x" * 8000 + b"</p>\r\n"
    job = job_with_tracked_copies(settings, dovecot, large)
    with dovecot.client() as client:
        outcome = sweep(client, settings, job)
    assert outcome.kept == 2
    assert outcome.removed == 0
    assert not outcome.added
    assert "the original could not be added" in outcome.why
    assert "[LIMIT] Mail size is larger" in outcome.why  # the server's words
    sent = dovecot.messages(SENT)
    assert len(sent) == 2  # both tracked copies still there: Sent has the message
    assert all(tracked(settings, data) for data, _ in sent)


def test_a_connection_lost_after_the_append_leaves_the_original(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot
) -> None:
    """The original first, then the removal: lost in between, both are there."""
    settings = make_settings(imap_sent_window=0.0, imap_sent_interval=0.1)
    job = job_with_tracked_copies(settings, dovecot)
    client = DropsAfter("127.0.0.1", port=dovecot.port, ssl=False, timeout=10)
    client.login(ANN, DOVECOT_PASSWORD)
    with pytest.raises(sentfolder.imapsession.WIRE_ERRORS):
        sweep(client, settings, job)
    sent = [data for data, _ in dovecot.messages(SENT)]
    assert MESSAGE in sent  # the original was added before anything was removed
    assert len(sent) == 3


def test_a_client_copy_lets_the_tracked_ones_go_at_once(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot
) -> None:
    settings = make_settings(imap_sent_window=0.0, imap_sent_interval=0.1)
    job = job_with_tracked_copies(settings, dovecot)
    dovecot.append(SENT, MESSAGE, flags=(b"\\Seen",))  # the client's own
    with dovecot.client() as client:
        outcome = sweep(client, settings, job)
    assert (outcome.removed, outcome.added, outcome.client_copy) == (2, False, True)
    assert [data for data, _ in dovecot.messages(SENT)] == [MESSAGE]


def test_an_unknown_charset_is_read_not_raised(make_settings: MakeSettings) -> None:
    signer = Signer(make_settings().signing_keys())
    url = f"https://t.example.com/o/{signer.open_token(42, 1)}.gif".encode()
    data = (
        b"Message-ID: <plan-1@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=unknown-8bit\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n<p>Gr\xfc\xdfe</p><img src='" + url + b"'>\r\n"
    )
    assert sentfolder.kind(signer, 42, data) == sentfolder.TRACKED


def test_a_failing_clean_is_logged_with_the_address_never_raised(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The database gone under a cleaning: logged with the address and message."""
    settings = make_settings()
    gone = create_engine("sqlite:////nonexistent-directory/relay.db")
    job = sentfolder.Job(1, 42, "<plan-1@example.com>", MESSAGE, 1, ANN)
    with caplog.at_level(logging.WARNING, logger="relay.sentfolder"):
        assert asyncio.run(sentfolder.Cleaner(settings, gone).clean(job)) is None
    gone.dispose()
    assert f"Sent folder of {ANN} not cleaned (message 42)" in caplog.text

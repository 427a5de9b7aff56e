"""Replies and bounces from the INBOX of each connected mailbox, over IMAP.

:class:`InboxWatcher` (started by relay/server.py when
``TRACKRELAY_IMAP_WATCH`` is on and a provider has ``imap``) keeps one thread
per ``ok`` connection (shared/mailbox.py ``imap_connections``; looked for
again every :attr:`Settings.imap_poll_interval` seconds, so a connection made
in the dashboard is watched without a restart). Each thread:

1. logs in with the connection's grant (relay/imapsession.py) and selects
   INBOX read-only (``EXAMINE``: no flag can change);
2. reads the messages after the last UID it stored (``inbox_last_uid``, of
   the stored ``inbox_uidvalidity``; a mailbox seen for the first time, or
   recreated, from the messages that arrived since the connection was made),
   the first 256 KiB of each with ``BODY.PEEK[]<0.262144>`` (headers and
   report parts, as the intake reads them; nothing is marked read);
3. hands each to shared/answers.py ``classify`` and what it finds to the
   relay's one answer writer (relay/answerstore.py ``AnswerWriter``, the
   intake's when the intake listens), and stores the UID once the writer has
   committed or journaled it;
4. reads again at once when the server announced a message (EXISTS) after
   that SEARCH (IDLE would not announce it again: :meth:`_Watch.announced`), else
   waits with IDLE where the server has it (renewed, and a look taken, every
   :attr:`Settings.imap_idle_timeout` seconds), or looks again every
   :attr:`Settings.imap_poll_interval` seconds; a lost connection or a server
   error reconnects after a back-off doubling from 1 s to
   :attr:`Settings.imap_backoff_max`, back to 1 s once a session ran well
   (it selected INBOX and read it: a routine drop after hours of IDLE is not
   a failing server). A broken connection ends its thread (a fresh token
   refused marks it broken, relay/imapsession.py, and this says why).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from imapclient import IMAPClient
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from relay import imapsession
from relay.answerstore import AnswerWriter, item
from relay.intake import copy_key
from shared import mailbox
from shared.answers import classify, parse
from shared.config import Settings
from shared.models import utcnow

log = logging.getLogger(__name__)

READ_BYTES = 262_144  # as relay/intake.py: headers and report parts
FETCH_SLICE = 50  # messages per FETCH
PEEK = f"BODY.PEEK[]<0.{READ_BYTES}>"
PEEKED = b"BODY[]<0>"
BACKOFF_START = 1.0  # seconds before the first reconnection
#: What a reconnection after a back-off may cure.
RETRIED: tuple[type[BaseException], ...] = (
    mailbox.MailboxUnavailable,
    imapsession.ImapUnavailable,
    SQLAlchemyError,
    *imapsession.WIRE_ERRORS,
)


class _Watch:
    """One connection's thread."""

    def __init__(self, owner: InboxWatcher, connection: mailbox.Imap) -> None:
        self.owner = owner
        self.connection = connection
        self.stopping = threading.Event()
        self.client: IMAPClient | None = None
        # Messages in INBOX as the last EXISTS kept said (IDLE's own are not kept:
        # a count too low costs one more look at most); None: unknown.
        self.size: int | None = None
        self.ran_well = False  # this session selected INBOX and read it
        self.waits: deque[float] = deque(maxlen=32)  # the last back-offs waited (s)
        self.thread = threading.Thread(
            target=self.run, name=f"trackrelay-imap-{connection.id}", daemon=True
        )

    def stop(self) -> None:
        self.stopping.set()
        client = self.client
        if client is not None:  # wakes a blocked IDLE or read
            try:
                client.shutdown()
            except Exception:
                log.debug("IMAP socket of %s already closed", self.connection.address)

    def run(self) -> None:
        backoff = BACKOFF_START
        while not self.stopping.is_set():
            self.ran_well = False
            try:
                self.session()
            except mailbox.MailboxBroken as exc:
                log.warning("INBOX of %s not watched: %s", self.connection.address, exc)
                return
            except imapsession.ImapRefused as exc:
                log.warning("INBOX of %s: %s", self.connection.address, exc)
                backoff = self.owner.settings.imap_backoff_max
            except RETRIED as exc:
                if self.stopping.is_set():
                    return
                backoff = self._after(backoff)
                log.warning(
                    "INBOX of %s: %s; again in %.0f s", self.connection.address, exc, backoff
                )
            except Exception:
                if self.stopping.is_set():  # stop() closed the socket under a read
                    return
                backoff = self._after(backoff)
                log.exception("INBOX of %s: again in %.0f s", self.connection.address, backoff)
            else:
                backoff = BACKOFF_START
            self.waits.append(backoff)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, self.owner.settings.imap_backoff_max)

    def _after(self, backoff: float) -> float:
        """The wait after a session ended by an error: from the start again if it ran well."""
        return BACKOFF_START if self.ran_well else backoff

    def session(self) -> None:
        settings, engine = self.owner.settings, self.owner.engine
        found = mailbox.imap_connection(engine, settings, self.connection.id)
        if found is None:
            raise mailbox.MailboxBroken("the connection is broken or has no imap server")
        client = imapsession.open_session(settings, engine, found.id, found.provider)
        self.client = client
        try:
            self.size = None
            state = client.select_folder("INBOX", readonly=True)
            validity = int(state.get(b"UIDVALIDITY", 0))
            last = self.start(client, state, found, validity)
            idle = b"IDLE" in client.capabilities()
            while not self.stopping.is_set():
                last = self.read(client, validity, last)
                self.ran_well = True
                if not self.announced(client):  # else: arrived after the SEARCH, read it now
                    self.wait(client, idle)
        finally:
            self.client = None
            imapsession.close(client)

    def start(
        self, client: IMAPClient, state: dict[bytes, Any], found: mailbox.Imap, validity: int
    ) -> int:
        """The last UID already read: the stored one, or, for a mailbox seen the first
        time (or recreated: another UIDVALIDITY), the one before what arrived since
        the connection was made."""
        if found.uidvalidity and validity == found.uidvalidity:
            return found.last_uid
        recent = client.search(["SINCE", (found.created_at - timedelta(days=1)).date()])
        last = min(recent) - 1 if recent else int(state.get(b"UIDNEXT", 1)) - 1
        mailbox.inbox_seen(self.owner.engine, found.id, validity, last)
        return last

    def read(self, client: IMAPClient, validity: int, last: int) -> int:
        """Everything after LAST; the new last UID (stored once the writer has it)."""
        self.announced(client)  # what came before this SEARCH, the SEARCH finds
        uids = client.search(["UID", f"{last + 1}:*"])
        for chunk in _slices(sorted(uid for uid in uids if uid > last)):
            for uid, data in sorted(client.fetch(chunk, [PEEK]).items()):
                self.owner.take(bytes(data.get(PEEKED, b"")), self.connection.address)
                last = uid
            mailbox.inbox_seen(self.owner.engine, self.connection.id, validity, last)
        return last

    def announced(self, client: IMAPClient) -> bool:
        """Whether the server announced a message since the last call: an EXISTS with
        another count than the last one, or any after an EXPUNGE (one gone, one come).

        A server tells a client of a new message once, in the untagged responses of
        whatever command comes next (RFC 3501 7.3.1 and 5.2): one that arrived after
        the SEARCH is announced during the FETCH or NOOP after it, and IDLE, which
        reports only what the client was not yet told, never repeats it (RFC 2177).
        IMAPClient offers no record of those responses (NOOP and IDLE return only
        their own), but the imaplib connection it wraps (``client._imap``) keeps
        one: every untagged response a command does not consume (FETCH consumes
        ``FETCH``, SEARCH ``SEARCH``) stays in ``untagged_responses`` by name until
        taken, and ``IMAP4.response(name)`` (imaplib's public method) takes them.
        ``EXISTS`` and ``EXPUNGE`` are taken before each SEARCH and once more before
        IDLE, so none is lost and none piles up in a session of days; the count
        compared, a server that repeats an unchanged EXISTS (RFC 9051 allows it)
        costs no more looks. (A NOOP before IDLE would not do: it reports only what
        came after the FETCH, and the gap is what came during it. UIDNEXT comes with
        SELECT, and STATUS should not be asked of the selected mailbox, RFC 3501
        6.3.10.)
        """
        told: list[bytes | None] = client._imap.response("EXISTS")[1]  # [None]: none
        expunged = client._imap.response("EXPUNGE")[1] != [None]
        counts = [int(count) for count in told if count is not None]
        news = bool(counts) and (expunged or counts[-1] != self.size)
        self.size = None if expunged else counts[-1] if counts else self.size
        return news

    def wait(self, client: IMAPClient, idle: bool) -> None:
        settings = self.owner.settings
        if not idle:
            self.stopping.wait(settings.imap_poll_interval)
            client.noop()
            return
        client.idle()
        try:
            client.idle_check(timeout=settings.imap_idle_timeout)
        finally:
            if not self.stopping.is_set():
                client.idle_done()


def _slices(uids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(uids), FETCH_SLICE):
        yield uids[start : start + FETCH_SLICE]


class InboxWatcher:
    """Every connection's watch, started and stopped with the relay."""

    def __init__(self, settings: Settings, engine: Engine, writer: AnswerWriter | None) -> None:
        self.settings = settings
        self.engine = engine
        self.own_writer = writer is None
        self.writer = writer or AnswerWriter(settings, engine)
        self.watches: dict[int, _Watch] = {}
        self.answers = 0  # messages with findings handed to the writer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.own_writer:
            await self.writer.start()
        await self.look()
        self._task = self._loop.create_task(self._keep_looking())

    async def look(self) -> None:
        """Watch the connections there are now; let go of those gone or broken."""
        try:
            found = await asyncio.to_thread(mailbox.imap_connections, self.engine, self.settings)
        except SQLAlchemyError as exc:
            log.warning("cannot read the mailbox connections: %s", exc)
            return
        wanted = {c.id: c for c in found}
        for connection_id in [i for i in self.watches if i not in wanted]:
            self.watches.pop(connection_id).stop()
        for connection_id, connection in wanted.items():
            watch = self.watches.get(connection_id)
            if watch is None or not watch.thread.is_alive():
                self.watches[connection_id] = watch = _Watch(self, connection)
                watch.thread.start()

    async def _keep_looking(self) -> None:
        """The watcher's one task (stop() awaits it): a failing look is logged, and the
        next one comes all the same."""
        while True:
            await asyncio.sleep(self.settings.imap_poll_interval)
            try:
                await self.look()
            except Exception:
                log.exception("cannot look for mailbox connections to watch; again soon")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for watch in self.watches.values():
            watch.stop()
        for watch in self.watches.values():
            await asyncio.to_thread(watch.thread.join, self.settings.imap_timeout)
        self.watches.clear()
        if self.own_writer:
            await self.writer.stop()

    def take(self, data: bytes, address: str) -> None:
        """In a watch's thread: classify one message and wait until it is stored."""
        message = parse(data)
        findings = classify(message)
        if not findings or self._loop is None:
            return
        self.answers += 1
        answer: dict[str, Any] = item(copy_key(message, data), utcnow(), findings)
        asyncio.run_coroutine_threadsafe(self.writer.put(answer), self._loop).result()
        kinds = [f.kind + (f" ({f.bounce_type})" if f.bounce_type else "") for f in findings]
        log.info("INBOX of %s: %s taken", address, ", ".join(kinds))

"""Write what was relayed: the Message, one Recipient row each, the Links.

The write runs off the event loop (``asyncio.to_thread``) after the upstream
has answered. A database failure must never turn a delivered message into an
error for the client (who would retry and deliver it twice), and must not
lose the record either: tokens are self-contained, so mail keeps flowing
while the database is down, and its records go to an append-only journal
(``<var_dir>/journal/relay-<pid>-....jsonl``, shared/journal.py) instead.

While degraded, records go straight to the journal (no client waits for a
dead database); every ``PROBE_INTERVAL`` s the recorder replays the journal,
which doubles as the probe. A record (message, recipients, links and the
``message.sent`` outbox rows) is one transaction keyed by the message id, the
primary key: a replay that repeats a record (a crash between commit and
deleting the file) finds the message there and skips it, so every record is
stored exactly once. A restarted relay replays what its predecessors left.

If the journal cannot be written either (disk full), the record is lost —
never the mail — and that is logged at ERROR with the message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.exc import DataError, IntegrityError
from sqlmodel import Session

from relay.track import Prepared
from relay.upstream import Reply
from shared.config import Settings
from shared.db import session_scope
from shared.journal import Journal
from shared.models import Link, Message, Recipient
from shared.outbox import enqueue_message_sent

log = logging.getLogger(__name__)

#: Seconds between replay attempts while records wait in the journal.
PROBE_INTERVAL = 1.0
#: SQLite: how long one record waits for the write lock before it is journaled.
SQLITE_WRITE_TIMEOUT = 2.0
#: Records replayed per transaction batch.
REPLAY_SLICE = 200

Record = dict[str, Any]


@dataclass
class Delivery:
    """How one client DATA ended: a reply per recipient and the client's reply."""

    replies: dict[str, Reply]  # every recipient of the message, in RCPT order
    refused_at_rcpt: list[tuple[str, Reply]]  # refused before DATA (client saw it)
    reply: Reply  # what the client gets

    @property
    def status(self) -> str:
        accepted = sum(r.ok for r in self.replies.values())
        if accepted == len(self.replies) and not self.refused_at_rcpt:
            return "sent"
        return "partial" if accepted else "failed"


def to_record(prepared: Prepared, delivery: Delivery) -> Record:
    """Everything one relayed message stores, as JSON-ready data."""
    message = prepared.message
    message.status = delivery.status
    message.upstream_reply = str(delivery.reply)
    outcomes = [*delivery.replies.items(), *delivery.refused_at_rcpt]
    recipients = [
        {
            "message_id": message.id,
            "position": position,
            "address": address,
            "tracked": address in prepared.tracked_recipients,
            "status": "accepted" if reply.ok else "refused",
            "reply_code": reply.code,
            "reply_text": reply.text,
        }
        for position, (address, reply) in enumerate(outcomes, start=1)
    ]
    return {
        "message": message.model_dump(mode="json"),
        "recipients": recipients,
        "links": [link.model_dump(mode="json", exclude={"id"}) for link in prepared.links],
    }


def write_record(engine: Engine, record: Record) -> bool:
    """Store one record in one transaction; False when it was already there."""
    message = Message.model_validate(record["message"])
    with session_scope(engine) as session, _short_lock_wait(session):
        if session.get(Message, message.id) is not None:
            return False
        recipients = [Recipient.model_validate(r) for r in record["recipients"]]
        session.add(message)
        session.add_all(recipients)
        session.flush()
        if record["links"]:
            # One executemany: a newsletter has ~30 links, and ORM objects for
            # them cost three times the insert itself.
            session.execute(insert(Link), record["links"])
        # message.sent / delivery.failed webhooks commit with the message.
        enqueue_message_sent(session, message, recipients)
    return True


@contextlib.contextmanager
def _short_lock_wait(session: Session) -> Iterator[None]:
    """A locked SQLite file sends the record to the journal soon, not in 30 s."""
    if session.get_bind().dialect.name != "sqlite":
        yield
        return
    conn = session.connection()
    before = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(SQLITE_WRITE_TIMEOUT * 1000)}")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # the connection may be gone with the database
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(before or 0)}")


class Recorder:
    """Stores relayed messages; journals them while the database is down."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.engine = engine
        self.journal = Journal(settings.var_dir / "journal", prefix="relay")
        self.degraded = False
        self.journaled = 0
        self.replayed = 0
        self.lost = 0
        self._lock = asyncio.Lock()  # the journal is used one call at a time
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the replay loop (it first replays what a previous run left)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="trackrelay-relay-journal")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        async with self._lock:
            await asyncio.to_thread(self.journal.close)

    async def record(self, prepared: Prepared, delivery: Delivery) -> None:
        """Log one INFO line and store the rows (or journal them); never raises."""
        message = prepared.message
        log.info(
            "relayed message %d from <%s> to %d recipient(s), %d bytes: %s (%s)",
            message.id,
            message.sender,
            len(delivery.replies),
            message.size_out,
            delivery.reply,
            delivery.status,
        )
        try:
            record = to_record(prepared, delivery)
        except Exception:
            log.exception("cannot build the record of message %d (mail was delivered)", message.id)
            return
        if not self.degraded:
            try:
                await asyncio.to_thread(write_record, self.engine, record)
                return
            except (DataError, IntegrityError):
                log.exception("the database refused the record of message %d", message.id)
                await self._set_aside([record])
                return
            except Exception as exc:
                self._degrade(exc, message.id)
        await self._journal(record)

    def _degrade(self, exc: Exception, message_id: int | None = None) -> None:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not self.degraded:
            log.error(
                "DATABASE WRITE FAILED%s (mail was delivered): %s; journaling message records",
                f" for relayed message {message_id}" if message_id is not None else "",
                first,
            )
        self.degraded = True

    async def _journal(self, record: Record) -> None:
        message_id = record["message"]["id"]
        try:
            async with self._lock:
                await asyncio.to_thread(self.journal.append, [record])
        except OSError:
            self.lost += 1
            log.exception(
                "RELAY JOURNAL WRITE FAILED: the record of message %d is lost (mail was delivered)",
                message_id,
            )
            return
        self.journaled += 1
        log.warning("message %d journaled (database unavailable)", message_id)

    async def _set_aside(self, records: list[Record]) -> None:
        async with self._lock:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.journal.append_rejected, records)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.replay()
            except Exception:  # never let the loop die: the next round retries
                log.exception("relay journal replay failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROBE_INTERVAL)
            self._wake.clear()

    async def replay(self) -> int:
        """Write what the journal holds; returns the records stored (0 if none or down)."""
        if not await asyncio.to_thread(self.journal.has_files):
            self.degraded = False
            return 0
        stored = 0
        async with self._lock:
            await asyncio.to_thread(self.journal.seal)  # our own file becomes replayable
            while not self._stopping:
                records = await asyncio.to_thread(self.journal.read_slice, REPLAY_SLICE)
                if not records:
                    break
                try:
                    stored += await asyncio.to_thread(self._write_slice, records)
                except Exception as exc:
                    self._degrade(exc)
                    return stored
                await asyncio.to_thread(self.journal.commit_slice)
        if stored:
            log.info("database back: %d journaled message record(s) written", stored)
        self.replayed += stored
        self.degraded = False
        return stored

    def _write_slice(self, records: list[Record]) -> int:
        stored = 0
        for record in records:
            try:
                stored += write_record(self.engine, record)
            except (DataError, IntegrityError):
                log.exception("the database refused journaled message %s", record["message"]["id"])
                self.journal.append_rejected([record])
        return stored

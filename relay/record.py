"""Write what was relayed: the Message, one Recipient row each, the Links and the
``message.sent`` outbox rows, committed before the client gets its reply.

Group commit. :meth:`Recorder.record` queues the record and waits for it; ONE
writer task takes everything queued (up to ``MAX_BATCH``) and stores it in ONE
transaction with SQLAlchemy Core, in a worker thread: one ``SELECT id FROM
messages WHERE id IN (...)`` (a record already stored is skipped: replays), one
executemany each for messages, recipients and links, one endpoint query and
one insert for the outbox rows (shared/outbox.py ``enqueue_messages_sent``).
Then every waiter of the batch is woken and its client gets its reply. There
is no delay: while one batch is written the next accumulates, so one client
gets batches of one and ten clients share commits. Per message this replaces
an ORM unit of work (object states, flush ordering), a ``Session.get`` and an
endpoint query; rows are plain dicts built from the record (the JSON the
journal keeps), with the model's defaults, so they are the rows the ORM wrote.

Why a task on the event loop that hands each batch to ``asyncio.to_thread``,
not a thread of its own: the queue, the waiters' futures, the degraded flag
and the journal (used one call at a time) all stay on the loop, so they need
no locks and no cross-thread wake-up per waiter; the one hop to a thread and
back per batch is shared by the batch.

A database failure must never turn a delivered message into an error for the
client (who would retry and deliver it twice), and must not lose the record
either: tokens are self-contained, so mail keeps flowing while the database
is down, and the whole batch goes to an append-only journal
(``<var_dir>/journal/relay-<pid>-....jsonl``, shared/journal.py) instead.
SQLite: the writer has its own engine whose connections wait at most
``SQLITE_WRITE_TIMEOUT`` s for the write lock (set once per connection,
shared/db.py ``impatient_engine``), so a locked file sends the batch to the
journal soon, not in 30 s. A batch the database refuses as invalid
(``DataError``, ``IntegrityError``) is retried record by record, so only the
bad record is set aside (``rejected-relay.jsonl``, never replayed) and the
others are stored.

While degraded, records go straight to the journal (no client waits for a
dead database); every ``PROBE_INTERVAL`` s the writer replays the journal, a
slice of ``REPLAY_SLICE`` records per transaction between live batches, which
doubles as the probe. Every record is keyed by its message id, the primary
key: a replay that repeats a record (a crash between commit and deleting the
file) finds the message there and skips it, so every record is stored exactly
once. A restarted relay replays what its predecessors left; ``stop()`` writes
(or journals) what is still queued before it returns.

If the journal cannot be written either (disk full), the record is lost —
never the mail — and that is logged at ERROR with the message id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticUndefined
from sqlalchemy import Engine, bindparam, insert, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlmodel import SQLModel

from relay.track import Prepared
from relay.upstream import Reply
from shared.config import Settings
from shared.db import impatient_engine
from shared.isotime import moment
from shared.journal import Journal
from shared.models import Link, Message, Recipient
from shared.outbox import enqueue_messages_sent

log = logging.getLogger(__name__)

#: Seconds between replay attempts while records wait in the journal.
PROBE_INTERVAL = 1.0
#: SQLite: how long a batch waits for the write lock before it is journaled.
SQLITE_WRITE_TIMEOUT = 2.0
#: Most live records written in one transaction (more wait for the next one).
MAX_BATCH = 500
#: Journaled records replayed per transaction.
REPLAY_SLICE = 200

Record = dict[str, Any]
Row = dict[str, Any]

MESSAGES = Message.__table__  # type: ignore[attr-defined]
RECIPIENTS = Recipient.__table__  # type: ignore[attr-defined]
LINKS = Link.__table__  # type: ignore[attr-defined]
# Built once: a batch executes them, it does not rebuild them.
STORED = select(MESSAGES.c.id).where(MESSAGES.c.id.in_(bindparam("ids", expanding=True)))
INSERT_MESSAGES, INSERT_RECIPIENTS, INSERT_LINKS = (
    insert(MESSAGES),
    insert(RECIPIENTS),
    insert(LINKS),
)


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
        "links": [link._asdict() for link in prepared.links],
    }


def _defaults(model: type[SQLModel]) -> dict[str, Any]:
    """The values ``model_validate`` fills in for absent fields (not factories)."""
    return {
        name: field.default
        for name, field in model.model_fields.items()
        if field.default is not PydanticUndefined and field.default_factory is None
    }


def _columns(table: Any) -> tuple[str, ...]:
    """Every column but an autoincrement id (the database numbers those rows)."""
    return tuple(c.name for c in table.columns if not (c.primary_key and c.autoincrement))


class _Rows:
    """One record as the column values of its rows: what the ORM inserted for it.

    The record is the JSON of the models (``to_record``, or a journal line):
    absent fields take the model's defaults and unknown keys are ignored, as
    ``model_validate`` did, and ``created_at`` is parsed back to the aware
    datetime it was. No model objects: validating them cost more than the
    insert (~0.2 ms a message, ~0.1 ms a recipient).
    """

    _message = (_columns(MESSAGES), _defaults(Message))
    _recipient = (_columns(RECIPIENTS), _defaults(Recipient))
    _link = (_columns(LINKS), _defaults(Link))

    def __init__(self, record: Record) -> None:
        self.record = record
        values = dict(record["message"])
        values["created_at"] = moment(values.get("created_at"))
        self.message = _row(values, *self._message)
        self.id: int = self.message["id"]
        self.recipients = [_row(r, *self._recipient) for r in record["recipients"]]
        self.links = [_row(link, *self._link) for link in record["links"]]


def _row(values: Mapping[str, Any], columns: tuple[str, ...], defaults: Mapping[str, Any]) -> Row:
    # A required field absent (no default): KeyError, the record cannot be stored.
    return {c: values[c] if c in values else defaults[c] for c in columns}


class RecordStore:
    """The database side of the writer; its methods block (run them in a thread)."""

    def __init__(self, engine: Engine) -> None:
        self.shared = engine
        self.engine = impatient_engine(engine, SQLITE_WRITE_TIMEOUT)

    def write(self, records: list[Record]) -> tuple[int, list[Record]]:
        """Store ``records``; return (records stored, records refused as invalid).

        Records already stored are skipped. Anything but an invalid record
        (the database is down, locked, unreachable) raises: nothing of the
        batch was stored or the rest is safe to write again.
        """
        batch: list[_Rows] = []
        refused: list[Record] = []
        for record in records:
            try:
                batch.append(_Rows(record))
            except Exception:
                log.exception("the record of message %s is unreadable", _message_id(record))
                refused.append(record)
        if not batch:
            return 0, refused
        try:
            return self._insert(batch), refused
        except (DataError, IntegrityError):
            if len(batch) == 1:
                log.exception("the database refused the record of message %d", batch[0].id)
                return 0, [*refused, batch[0].record]
        log.warning(
            "the database refused a batch of %d records: writing them one by one", len(batch)
        )
        stored = 0
        for rows in batch:
            try:
                stored += self._insert([rows])
            except (DataError, IntegrityError):
                log.exception("the database refused the record of message %d", rows.id)
                refused.append(rows.record)
        return stored, refused

    def _insert(self, batch: list[_Rows]) -> int:
        """One transaction; returns how many records were new."""
        with self.engine.begin() as conn:
            ids = [rows.id for rows in batch]
            seen = set(conn.execute(STORED, {"ids": ids}).scalars())
            new = []
            for rows in batch:
                if rows.id not in seen:  # also a record twice in one batch
                    seen.add(rows.id)
                    new.append(rows)
            if not new:
                return 0
            conn.execute(INSERT_MESSAGES, [rows.message for rows in new])
            recipients = [r for rows in new for r in rows.recipients]
            if recipients:
                conn.execute(INSERT_RECIPIENTS, recipients)
            links = [link for rows in new for link in rows.links]
            if links:
                conn.execute(INSERT_LINKS, links)
            # message.sent / delivery.failed webhooks commit with the messages.
            enqueue_messages_sent(conn, [(rows.message, rows.recipients) for rows in new])
        return len(new)

    def close(self) -> None:
        if self.engine is not self.shared:
            self.engine.dispose()


def _message_id(record: Any) -> Any:
    with contextlib.suppress(Exception):
        return record["message"]["id"]
    return "?"


class Recorder:
    """Stores relayed messages in batches; journals them while the database is down."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.engine = engine
        self.store = RecordStore(engine)
        self.journal = Journal(settings.var_dir / "journal", prefix="relay")
        self.degraded = False
        self.journaled = 0
        self.replayed = 0
        self.lost = 0
        self.batches = 0  # live batches committed ...
        self.written = 0  # ... and the live records they stored
        self._pending: list[tuple[Record, asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()  # the store and the journal, one call at a time
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._replay_at = 0.0  # loop time of the next replay round
        self._replaying = False  # a round is under way: one slice per turn
        self._replay_stored = 0

    async def start(self) -> None:
        """Start the writer (it first replays what a previous run left)."""
        self._stopping = False
        self._replay_at = 0.0
        self._task = asyncio.create_task(self._run(), name="trackrelay-relay-recorder")

    async def stop(self) -> None:
        """Write (or journal) every queued record, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        async with self._lock:
            while self._pending:
                await self._write_pending()
            await asyncio.to_thread(self.journal.close)
        self.store.close()

    async def record(self, prepared: Prepared, delivery: Delivery) -> None:
        """Log one INFO line and store the rows (or journal them); never raises.

        Returns once the record is committed or journaled, so the client's
        reply never runs ahead of it.
        """
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
        done = asyncio.get_running_loop().create_future()
        self._pending.append((record, done))
        if self._task is None or self._task.done():  # no writer (not started, or stopped)
            async with self._lock:
                while self._pending:
                    await self._write_pending()
        else:
            self._wake.set()
        await done

    # --- the writer ---

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not self._stopping and not self._replaying:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._replay_at - loop.time())
                self._wake.clear()
            if self._stopping and not self._pending:
                return
            try:
                async with self._lock:
                    if self._pending:
                        await self._write_pending()
                    # Due even under steady traffic: it is also the probe while degraded.
                    if (self._replaying or loop.time() >= self._replay_at) and not self._stopping:
                        await self._replay_step()
            except Exception:  # never let the writer die: the next round retries
                log.exception("relay record writer failed")
                self._replaying = False

    async def _write_pending(self) -> None:
        """One batch: everything queued (up to MAX_BATCH); then wake its waiters."""
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        try:
            await self._store([record for record, _ in batch])
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _store(self, records: list[Record]) -> None:
        if not self.degraded:
            try:
                stored, refused = await asyncio.to_thread(self.store.write, records)
            except Exception as exc:
                self._degrade(exc, records)
            else:
                self.batches += 1
                self.written += stored
                if refused:
                    await self._set_aside(refused)
                return
        await self._journal(records)

    def _degrade(self, exc: Exception, records: list[Record] | None = None) -> None:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not self.degraded:
            ids = ", ".join(str(_message_id(r)) for r in records or [])
            log.error(
                "DATABASE WRITE FAILED%s (mail was delivered): %s; journaling message records",
                f" for relayed message(s) {ids}" if ids else "",
                first,
            )
        self.degraded = True

    async def _journal(self, records: list[Record]) -> None:
        error: BaseException | None
        try:
            written, error = await asyncio.to_thread(self.journal.append_what_fits, records)
        except Exception as exc:  # not even a bug may lose records without a word
            written, error = 0, exc
        self.journaled += written
        for record in records[:written]:
            log.warning("message %s journaled (database unavailable)", _message_id(record))
        for record in records[written:]:
            self.lost += 1
            log.error(
                "RELAY JOURNAL WRITE FAILED: the record of message %s is lost (mail was delivered)",
                _message_id(record),
                exc_info=error,
            )

    async def _set_aside(self, records: list[Record]) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.journal.append_rejected, records)

    async def _replay_step(self) -> None:
        """One slice of the journal; a round goes on until the journal is empty."""
        if not self._replaying:
            self._replay_at = asyncio.get_running_loop().time() + PROBE_INTERVAL
            if not await asyncio.to_thread(self.journal.has_files):
                self.degraded = False
                return
            await asyncio.to_thread(self.journal.seal)  # our own file becomes replayable
            self._replaying, self._replay_stored = True, 0
        records = await asyncio.to_thread(self.journal.read_slice, REPLAY_SLICE)
        if not records:
            self._replaying = False
            self.degraded = False
            if self._replay_stored:
                log.info(
                    "database back: %d journaled message record(s) written", self._replay_stored
                )
            return
        try:
            stored, refused = await asyncio.to_thread(self.store.write, records)
        except Exception as exc:
            self._replaying = False
            self._degrade(exc)
            return
        self.degraded = False  # the probe worked: live records go to the database again
        if refused:
            await self._set_aside(refused)
        await asyncio.to_thread(self.journal.commit_slice)
        self._replay_stored += stored
        self.replayed += stored

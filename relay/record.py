"""Write what was relayed: the Message, one Recipient row each, the Links and the
``message.sent`` outbox rows, committed before the client gets its reply.

Group commit (shared/groupcommit.py, its ``SpooledWriter`` wires the journal,
the spool and the writer task as for the answers): :meth:`Recorder.record` queues
the record and waits for it; ONE writer task takes everything queued (up to
``MAX_BATCH``) and :class:`RecordStore` stores it in ONE transaction with
SQLAlchemy Core, in a worker thread: one ``SELECT id FROM messages WHERE id IN
(...)`` (a record already stored is skipped: replays), one executemany each
for messages, recipients and links, the rollups (shared/eventstate.py
``recorded``: one upsert each for the day's figures and the senders), one
endpoint query and one insert for the outbox rows (shared/outbox.py
``enqueue_messages_sent``). Then every waiter of
the batch is woken and its client gets its reply. Per message this replaces an
ORM unit of work (object states, flush ordering), a ``Session.get`` and an
endpoint query; rows are plain dicts built from the record (the JSON the
journal keeps), with the model's defaults, so they are the rows the ORM wrote.

A database failure must never turn a delivered message into an error for the
client (who would retry and deliver it twice), and must not lose the record
either: tokens are self-contained, so mail keeps flowing while the database
is down, and the whole batch goes to an append-only journal
(``<var_dir>/journal/relay-<pid>-....jsonl``, shared/journal.py) instead, to be
replayed ``REPLAY_SLICE`` records per transaction once a probe succeeds
(shared/spool.py ``Spool`` decides all of that, for the receiver too). SQLite:
the writer has its own engine whose connections wait at most
``SQLITE_WRITE_TIMEOUT`` s for the write lock, so a locked file sends the
batch to the journal soon, not in 30 s. A batch the database refuses as
invalid is retried record by record, so only the bad record is set aside
(``rejected-relay.jsonl``, never replayed) and the others are stored.

Every record is keyed by its message id, the primary key: a replay that
repeats a record (a crash between commit and deleting the file) finds the
message there and skips it, so every record is stored exactly once. A
restarted relay replays what its predecessors left; ``stop()`` writes (or
journals) what is still queued before it returns. If the journal cannot be
written either (disk full), the record is lost — never the mail — and that is
logged at ERROR with the message id.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticUndefined
from sqlalchemy import Connection, Engine, bindparam, insert, select
from sqlmodel import SQLModel

from relay.prepared import Prepared
from relay.upstream import Reply
from shared import eventstate
from shared.config import Settings
from shared.db import impatient_engine
from shared.groupcommit import SpooledWriter
from shared.isotime import moment
from shared.models import Link, Message, Recipient
from shared.outbox import enqueue_messages_sent
from shared.spool import SQLITE_WRITE_TIMEOUT, Invalid, Store, first_line
from shared.storable import storable

log = logging.getLogger(__name__)

#: Most live records written in one transaction (more wait for the next one).
MAX_BATCH = 500
#: Journaled records replayed per transaction.
REPLAY_SLICE = 200
#: Seconds between looks for journal files that dead relays left (a glob).
SCAN_INTERVAL = 1.0

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
        "message": message.as_json(),
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
        # What readers and erasure look rows up by (shared/eventstate.py, shared/privacy.py).
        self.message["sender_key"] = self.message["sender"].lower()
        self.id: int = self.message["id"]
        self.recipients = [_row(r, *self._recipient) for r in record["recipients"]]
        for recipient in self.recipients:
            recipient["address_key"] = recipient["address"].lower()
        self.links = [_row(link, *self._link) for link in record["links"]]


def _row(values: Mapping[str, Any], columns: tuple[str, ...], defaults: Mapping[str, Any]) -> Row:
    # A required field absent (no default): KeyError, the record cannot be stored.
    # Text is made storable here, where every record (new or replayed) becomes rows.
    row = {c: values[c] if c in values else defaults[c] for c in columns}
    return {c: storable(v) if isinstance(v, str) else v for c, v in row.items()}


class RecordStore(Store[Record]):
    """The database side of the writer (its methods block: the spool runs them in a
    thread), and the relay's words for what the spool did."""

    def __init__(self, engine: Engine) -> None:
        self.shared = engine
        self.engine = impatient_engine(engine, SQLITE_WRITE_TIMEOUT)

    def write(self, records: list[Record], replay: bool) -> int:
        """Store ``records`` in one transaction (those already stored are skipped)."""
        try:
            batch = [_Rows(record) for record in records]
        except Exception as exc:  # a required field absent, a date that is not one
            raise Invalid(f"an unreadable record: {exc!r}") from exc
        return self._insert(batch)

    def _insert(self, batch: list[_Rows]) -> int:
        """One transaction; returns how many records were new."""
        with self.engine.begin() as conn:
            return self._statements(conn, batch)

    def _statements(self, conn: Connection, batch: list[_Rows]) -> int:
        """What the transaction does (committed by :meth:`_insert`)."""
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
        # The day's rollup and the senders menu commit with the messages; so does the
        # state of a message whose hits came first (eventstate.recorded says how).
        eventstate.recorded(conn, [rows.id for rows in new])
        # message.sent / delivery.failed webhooks commit with the messages.
        enqueue_messages_sent(conn, [(rows.message, rows.recipients) for rows in new])
        return len(new)

    def to_record(self, item: Record) -> Record:
        return item  # the record is the journal's JSON already

    def from_record(self, record: Record) -> Record:
        return record  # read (and refused if unreadable) by write()

    def close(self) -> None:
        if self.engine is not self.shared:
            self.engine.dispose()

    # --- what the relay says (shared/spool.py Store hooks) ---

    def unavailable(self, error: Exception, items: list[Record], first: bool) -> None:
        if first:
            ids = ", ".join(str(_message_id(r)) for r in items)
            log.error(
                "DATABASE WRITE FAILED%s (mail was delivered): %s; journaling message records",
                f" for relayed message(s) {ids}" if ids else "",
                first_line(error),
            )

    def journaled(self, items: list[Record]) -> None:
        for record in items:
            log.warning("message %s journaled (database unavailable)", _message_id(record))

    def lost(self, items: list[Record], error: BaseException | None) -> None:
        for record in items:
            log.error(
                "RELAY JOURNAL WRITE FAILED: the record of message %s is lost (mail was delivered)",
                _message_id(record),
                exc_info=error,
            )

    def refusing(self, count: int, error: Exception) -> None:
        log.warning("the database refused a batch of %d records: writing them one by one", count)

    def set_aside(self, records: list[Record], error: BaseException, unreadable: bool) -> None:
        why = "is unreadable" if isinstance(error, Invalid) else "was refused by the database"
        for record in records:
            log.error("the record of message %s %s", _message_id(record), why, exc_info=error)

    def replayed_all(self, stored: int) -> None:
        log.info("database back: %d journaled message record(s) written", stored)


def _message_id(record: Any) -> Any:
    with contextlib.suppress(Exception):
        return record["message"]["id"]
    return "?"


class Recorder(SpooledWriter[Record, RecordStore]):
    """Stores relayed messages in batches; journals them while the database is down
    (shared/groupcommit.py ``SpooledWriter``: start, stop, replay, the journal)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        super().__init__(
            RecordStore(engine),
            settings.var_dir / "journal",
            "relay",
            max_batch=MAX_BATCH,
            replay_slice=REPLAY_SLICE,
            scan_interval=SCAN_INTERVAL,
            name="trackrelay-relay-recorder",
        )
        self.engine = engine

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
        await self.put(record)

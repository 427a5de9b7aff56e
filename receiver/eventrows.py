"""The writer's batch SQL: classify a batch of events and insert it, with the state
it changes (shared/eventstate.py) and its outbox rows, in one transaction
(receiver/eventstore.py runs it in the writer process).

Per hit this is the receiver's hot path, so a batch is made cheap: a verdict
(receiver/classify.py) is worked out once per distinct (user agent, IP, ...)
and remembered; the statements are SQL text built once and executed with the
driver (SQLite: a few multi-row INSERTs of power-of-two sizes; PostgreSQL: one
``unnest`` of column arrays), and dictionaries are built only for the rows
someone may be notified about (shared/outbox.py ``may_notify``). Each method
says what it measured against.

A batch's events carry their unique keys, so ``INSERT ... ON CONFLICT
(event_key) DO NOTHING`` absorbs a batch written twice (shared/db.py
``insert_ignoring_sql``).
"""

from __future__ import annotations

import itertools
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table

from receiver.classify import Hit, classify
from receiver.eventrecord import KeyedEvent, Row, truncate_ip
from shared import eventstate
from shared.db import insert_ignoring_sql
from shared.models import Event, Message
from shared.notable import may_notify
from shared.outbox import enqueue_for_events
from shared.verdicts import VERDICTS

#: Distinct (user agent, IP, ...) verdicts remembered.
VERDICT_CACHE_SIZE = 65536
#: SQLite: rows per INSERT at most (11 columns: far below the 32766 variables limit).
SQLITE_ROWS_PER_INSERT = 512

EVENTS: Table = Event.__table__  # type: ignore[attr-defined]
MESSAGES: Table = Message.__table__  # type: ignore[attr-defined]


#: The events table's columns in the order of a database row tuple.
COLUMNS = (
    "event_key",
    "message_id",
    "recipient_position",
    "link_position",
    "kind",
    "occurred_at",
    "ip",
    "user_agent",
    "method",
    "verdict",
    "reasons",
)
_KIND, _VERDICT = COLUMNS.index("kind"), COLUMNS.index("verdict")
_MESSAGE, _RECIPIENT, _OCCURRED = (
    COLUMNS.index("message_id"),
    COLUMNS.index("recipient_position"),
    COLUMNS.index("occurred_at"),
)

PG_TYPES = {
    "event_key": "varchar",
    "message_id": "bigint",
    "recipient_position": "integer",
    "link_position": "integer",
    "kind": "varchar",
    "occurred_at": "timestamptz",
    "ip": "varchar",
    "user_agent": "text",
    "method": "varchar",
    "verdict": "varchar",
    "reasons": "text",
}

#: (kind, verdict) pairs that may notify someone: only these become dictionaries.
NOTABLE = frozenset(
    (kind, verdict)
    for kind in ("open", "click")
    for verdict in VERDICTS
    if may_notify(kind, verdict)
)


class _Collision(Exception):
    """A live batch met a key already stored: redo it finding out which rows are new."""


@dataclass
class Written:
    """What one write did: rows inserted, by (kind, verdict), and the ones that notify."""

    inserted: int = 0
    recorded: Counter[tuple[str, str]] = field(default_factory=Counter)
    notable: list[Row] = field(default_factory=list)  # inserted rows that may notify someone
    duplicates: int = 0

    def add(self, other: Written) -> None:
        self.inserted += other.inserted
        self.recorded.update(other.recorded)
        self.notable += other.notable
        self.duplicates += other.duplicates


@dataclass
class _MessageFacts:
    sent_at: float  # POSIX timestamp
    client_ip: str


class SqliteTime:
    """``occurred_at`` as SQLAlchemy stores a DateTime in SQLite, from a POSIX timestamp.

    Equal to the column's bind processor applied to ``datetime.fromtimestamp(t, UTC)``
    (same half-even rounding to the microsecond; a test checks it), at a fifth of
    the cost: the date and time of day are formatted once per second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, timestamp: float) -> str:
        second = int(timestamp)
        micro = round((timestamp - second) * 1e6)
        if micro >= 1_000_000:
            second += 1
            micro -= 1_000_000
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            self._second = second
        return "%s.%06d" % (self._prefix, micro)  # noqa: UP031 - twice as fast as f"{:06d}"


def _aware(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class BatchStore:
    """Classify and insert one batch, with its outbox rows, in one transaction."""

    def __init__(self, engine: Engine, store_full_ip: bool, notify_email: bool = False) -> None:
        self.engine = engine
        self.store_full_ip = store_full_ip
        self.notify_email = notify_email
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database: {self.dialect}")
        self._verdicts: dict[tuple[Any, ...], tuple[str, str, str]] = {}
        self._db_time: Callable[[float], Any] = SqliteTime() if self.dialect == "sqlite" else _aware
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._marker = marker
        self._values_row = f"({', '.join([marker] * len(COLUMNS))})"
        # What SQLAlchemy does to a DateTime it reads (SQLite: parse the stored text).
        created_at = MESSAGES.c.created_at.type.dialect_impl(engine.dialect)
        self._read_time = created_at.result_processor(engine.dialect, None)
        self._values_sql: dict[tuple[int, bool], str] = {}
        casts = ", ".join(f"%s::{PG_TYPES[c]}[]" for c in COLUMNS)
        self._unnest_sql = {
            returning: _insert_events(f"SELECT * FROM unnest({casts})", returning)  # noqa: S608
            for returning in (False, True)
        }

    def write(self, events: list[KeyedEvent], replay: bool = False) -> Written:
        """Insert ``events`` (new rows only) with their outbox rows, in one transaction.

        ``replay``: some may be stored already (a live batch that meets a stored
        key is redone so). A row the database refuses raises DataError or
        IntegrityError (shared/spool.py then writes the batch event by event);
        anything else raised: the database is unavailable.
        """
        try:
            return self._write(events, returning=replay)
        except _Collision:
            return self._write(events, returning=True)

    def _write(self, events: list[KeyedEvent], returning: bool) -> Written:
        """``returning``: find out which rows are new (replays); else all must be."""
        with self.engine.begin() as conn:
            rows = self.rows(conn, events)
            duplicates = 0
            if returning:
                new = self._insert_returning(conn, rows)
                if len(new) < len(rows):
                    kept = [(e, r) for e, r in zip(events, rows, strict=True) if r[0] in new]
                    duplicates = len(rows) - len(kept)
                    events, rows = [e for e, _ in kept], [r for _, r in kept]
            elif self._insert(conn, rows) != len(rows):
                raise _Collision  # rolls the transaction back
            written = self._summary(events, rows)
            written.duplicates = duplicates
            # The recipients', messages' and daily figures commit with their events.
            eventstate.apply(conn, map(_facts, rows))
            # Webhook and mail notifications commit with their events.
            enqueue_for_events(conn, written.notable, notify_email=self.notify_email)
        return written

    def _summary(self, events: list[KeyedEvent], rows: list[tuple[Any, ...]]) -> Written:
        recorded = Counter(map(operator.itemgetter(_KIND, _VERDICT), rows))
        notable = []
        if not NOTABLE.isdisjoint(recorded):  # scanners and self hits build no dictionaries
            notable = [
                self._as_dict(event, row)
                for event, row in zip(events, rows, strict=True)
                if (row[_KIND], row[_VERDICT]) in NOTABLE
            ]
        return Written(inserted=len(rows), recorded=recorded, notable=notable)

    @staticmethod
    def _as_dict(event: KeyedEvent, row: tuple[Any, ...]) -> Row:
        values = dict(zip(COLUMNS, row, strict=True))
        values["occurred_at"] = _aware(event[1])
        return values

    # --- inserting ---

    def _insert(self, conn: Connection, rows: list[tuple[Any, ...]]) -> int:
        """Insert ``rows`` skipping stored keys; return how many were inserted."""
        if self.dialect == "postgresql":
            return int(conn.exec_driver_sql(self._unnest_sql[False], self._arrays(rows)).rowcount)
        inserted = 0
        for sql, params in self._values(rows, returning=False):
            inserted += conn.exec_driver_sql(sql, params).rowcount
        return inserted

    def _insert_returning(self, conn: Connection, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert ``rows`` skipping stored keys; return the keys inserted."""
        if self.dialect == "postgresql":
            sql = self._unnest_sql[True]
            return set(conn.exec_driver_sql(sql, self._arrays(rows)).scalars())
        new: set[str] = set()
        for sql, params in self._values(rows, returning=True):
            new.update(conn.exec_driver_sql(sql, params).scalars())
        return new

    @staticmethod
    def _arrays(rows: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
        """PostgreSQL: one array per column for ``unnest``.

        SQLAlchemy's multi-row VALUES makes psycopg parse a statement with
        thousands of placeholders on every batch, and psycopg's executemany
        costs a round trip per row; ``unnest`` of arrays costs neither.
        """
        if not rows:
            return tuple([] for _ in COLUMNS)
        return tuple(list(column) for column in zip(*rows, strict=True))

    def _values(
        self, rows: list[tuple[Any, ...]], returning: bool
    ) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """SQLite: multi-row INSERTs of power-of-two sizes (a few cached statements).

        sqlite3 releases the GIL around each statement step: one multi-row INSERT
        gives it up once, ``executemany`` once per row — and each time the
        event loop thread must hand it back before the next row is bound.
        """
        start = 0
        while start < len(rows):
            size = min(SQLITE_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))
            chunk = rows[start : start + size]
            start += size
            yield self._values_statement(size, returning), tuple(itertools.chain(*chunk))

    def _values_statement(self, size: int, returning: bool) -> str:
        sql = self._values_sql.get((size, returning))
        if sql is None:
            sql = _insert_events(f"VALUES {', '.join([self._values_row] * size)}", returning)
            self._values_sql[size, returning] = sql
        return sql

    # --- classifying ---

    def rows(self, conn: Connection, events: list[KeyedEvent]) -> list[tuple[Any, ...]]:
        """Database rows (in COLUMNS order) for ``events``, classified."""
        facts = self._message_facts(conn, {event[3] for event in events})
        verdicts = self._verdicts
        db_time = self._db_time
        rows = []
        for event in events:
            key, occurred, kind, message_id, recipient, link, ip, agent, method, purpose, dash = (
                event
            )
            message = facts.get(message_id)
            if message is None:
                sender_ip, after_send = "", None
            else:
                sender_ip = message.client_ip
                # Only click rules look at the send time; leaving it out of opens
                # lets their verdicts be remembered.
                after_send = occurred - message.sent_at if kind == "click" else None
            facts_key = (kind, method, agent, ip, purpose, dash, after_send, sender_ip)
            verdict = verdicts.get(facts_key)
            if verdict is None:
                verdict = self._judge(facts_key)
            rows.append(
                (
                    key,
                    message_id,
                    recipient,
                    link,
                    kind,
                    db_time(occurred),
                    verdict[2],
                    agent,
                    method,
                    verdict[0],
                    verdict[1],
                )
            )
        return rows

    def _judge(self, facts_key: tuple[Any, ...]) -> tuple[str, str, str]:
        """(verdict, reasons, stored IP) for one set of facts; remembered unless timed."""
        kind, method, agent, ip, purpose, dashboard, after_send, sender_ip = facts_key
        hit = Hit(
            kind=kind,
            method=method,
            user_agent=agent,
            ip=ip,
            purpose=purpose,
            dashboard_user=bool(dashboard),
            seconds_after_send=after_send,
            sender_ip=sender_ip,
        )
        verdict = classify(hit)
        value = (verdict.verdict, verdict.reason_text, truncate_ip(ip, self.store_full_ip))
        if after_send is None:  # a click's send delay is (nearly) never seen twice
            if len(self._verdicts) >= VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[facts_key] = value
        return value

    def _message_facts(self, conn: Connection, ids: Iterable[int]) -> dict[int, _MessageFacts]:
        """Send time and submitting IP of the batch's messages (those already recorded).

        Plain SQL: a Core ``select ... in_()`` costs more in SQLAlchemy's
        compilation and result set-up than the query itself, once per batch.
        """
        found: dict[int, _MessageFacts] = {}
        wanted = sorted(ids)
        for start in range(0, len(wanted), 500):
            chunk = tuple(wanted[start : start + 500])
            sql = (
                f"SELECT id, created_at, client_ip FROM {MESSAGES.name} "  # noqa: S608 - constants
                f"WHERE id IN ({', '.join([self._marker] * len(chunk))})"
            )
            for id_, created_at, client_ip in conn.exec_driver_sql(sql, chunk):
                when = self._read_time(created_at) if self._read_time else created_at
                if when is None:
                    continue
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                found[id_] = _MessageFacts(when.timestamp(), client_ip or "")
        return found


def _facts(row: tuple[Any, ...]) -> eventstate.Facts:
    """What shared/eventstate.py counts of one inserted row (a hit has no bounce type)."""
    return (row[_MESSAGE], row[_RECIPIENT], row[_KIND], row[_VERDICT], row[_OCCURRED], "")


def _insert_events(source: str, returning: bool) -> str:
    """The events INSERT skipping stored keys; ``returning``: it names the rows it added."""
    return insert_ignoring_sql(
        EVENTS.name, COLUMNS, source, "event_key", returning="event_key" if returning else ""
    )

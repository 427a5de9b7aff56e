"""The writer process: classify and store the receiver's events, or journal them.

Every receiver process (``trackrelay receiver``/``serve``, each uvicorn worker)
starts one: ``python -m receiver.eventstore`` (receiver/events.py,
:class:`~receiver.events.EventWriter`). Why a process and not a thread: the
batch write is mostly Python (classifying, binding rows, the outbox); in a
thread it takes the GIL from the event loop that answers pixels, and measured
under load that handing back and forth cost the receiver more CPU per hit than
the write itself. Here it runs beside the requests instead of between them.

It reads frames from stdin and answers on stdout; a frame is a 4-byte length
and a ``marshal`` payload (both ends are the same interpreter)::

    receiver -> writer   a config dict, then ("batch", id, key prefix, first number, [raw events])
    writer -> receiver   {"acked": [ids], figures for /metrics, "degraded", "notable": [rows]}

For each batch, one transaction: give each event its key (prefix + number,
chosen by the receiver, so a batch sent again to a new writer gets the same
keys and the unique constraint absorbs a repeat), classify it
(receiver/classify.py), INSERT ... ON CONFLICT DO NOTHING, and add the outbox
rows (shared/outbox.py). If the database cannot be written, the batch is
appended to the journal instead, and the writer keeps journaling until a probe
(every ``PROBE_INTERVAL`` s: a replay attempt) succeeds; journal files are
replayed a slice at a time between live batches. A batch is acknowledged once
it is committed or journaled (or, journal disk full, dropped and counted).

SIGINT and SIGTERM are ignored (a Ctrl-C reaches the whole process group): the
writer stops when its stdin closes, after writing or journaling everything it
read — so a receiver killed even by SIGKILL loses nothing it had handed over.
"""

from __future__ import annotations

import itertools
import logging
import marshal
import operator
import os
import select
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import DataError, IntegrityError

from receiver.classify import Hit, classify
from receiver.events import (
    FRAME_HEADER,
    KeyedEvent,
    RawEvent,
    Row,
    frame,
    from_record,
    keyed,
    to_record,
    truncate_ip,
)
from receiver.events import Journal as Journal
from shared import db
from shared.models import Event, Message
from shared.outbox import enqueue_for_events, may_notify
from shared.verdicts import VERDICTS

log = logging.getLogger("receiver.eventstore")  # also when run as __main__

#: Seconds between attempts to write again while the database is down.
PROBE_INTERVAL = 1.0
#: Seconds between looks for journal files left by other (dead) processes.
REPLAY_SCAN_INTERVAL = 10.0
#: SQLite: how long one batch waits for the write lock before journaling.
SQLITE_WRITE_TIMEOUT = 2.0
#: Batches from the receiver written in one transaction at most, when they queue up.
MERGED_BATCHES = 4
#: Journal rows replayed per writer round, between live batches.
REPLAY_SLICE = 2000
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
_OCCURRED = COLUMNS.index("occurred_at")

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


class DatabaseUnavailable(Exception):
    """A batch could not be written; it goes to the journal."""


class _Collision(Exception):
    """A live batch met a key already stored: redo it finding out which rows are new."""


@dataclass
class Written:
    """What one write did: rows inserted, by (kind, verdict), and the ones that notify."""

    inserted: int = 0
    recorded: Counter[tuple[str, str]] = field(default_factory=Counter)
    notable: list[Row] = field(default_factory=list)  # inserted rows that may notify someone
    duplicates: int = 0
    rejected: list[KeyedEvent] = field(default_factory=list)

    def add(self, other: Written) -> None:
        self.inserted += other.inserted
        self.recorded.update(other.recorded)
        self.notable += other.notable
        self.duplicates += other.duplicates
        self.rejected += other.rejected


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
    """Classify and insert one batch, with its outbox rows, in one transaction.

    Batches are made cheap: a verdict is worked out once per distinct (user
    agent, IP, ...) and remembered; SQLite gets a few multi-row INSERTs per
    batch, PostgreSQL one ``unnest`` of column arrays; dictionaries are built
    only for the rows someone may be notified about.
    """

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
        self._unnest_sql = (
            f"INSERT INTO {EVENTS.name} ({', '.join(COLUMNS)}) SELECT * FROM unnest({casts}) "  # noqa: S608
            "ON CONFLICT (event_key) DO NOTHING"
        )

    def write(self, events: list[KeyedEvent], replay: bool = False) -> Written:
        """Insert ``events`` (new rows only) with their outbox rows, in one transaction.

        Raises DatabaseUnavailable when the batch could not be written at all.
        """
        try:
            try:
                try:
                    return self._write(events, returning=replay)
                except _Collision:
                    return self._write(events, returning=True)
            except (DataError, IntegrityError):
                log.exception("the database refused a batch; writing it row by row")
                return self._one_by_one(events)
        except Exception as exc:
            raise DatabaseUnavailable(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc

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
            # Webhook and mail notifications commit with their events.
            enqueue_for_events(conn, written.notable, notify_email=self.notify_email)
        return written

    def _one_by_one(self, events: list[KeyedEvent]) -> Written:
        """A batch with a bad row: keep the good ones, set the bad ones aside."""
        written = Written()
        for event in events:
            try:
                done = self._write([event], returning=True)
            except (DataError, IntegrityError):
                written.rejected.append(event)
                continue
            written.add(done)
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
            return int(conn.exec_driver_sql(self._unnest_sql, self._arrays(rows)).rowcount)
        inserted = 0
        for sql, params in self._values(rows, returning=False):
            inserted += conn.exec_driver_sql(sql, params).rowcount
        return inserted

    def _insert_returning(self, conn: Connection, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert ``rows`` skipping stored keys; return the keys inserted."""
        if self.dialect == "postgresql":
            sql = self._unnest_sql + " RETURNING event_key"
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
            sql = (
                f"INSERT INTO {EVENTS.name} ({', '.join(COLUMNS)}) "  # noqa: S608 - constants
                f"VALUES {', '.join([self._values_row] * size)} "
                "ON CONFLICT (event_key) DO NOTHING" + (" RETURNING event_key" if returning else "")
            )
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


# --- the process -----------------------------------------------------------------


@dataclass
class Report:
    """What the writer tells the receiver after a round (see the module docstring)."""

    acked: list[int] = field(default_factory=list)
    recorded: Counter[tuple[str, str]] = field(default_factory=Counter)
    writes: list[float] = field(default_factory=list)  # seconds per database write
    journaled: int = 0
    replayed: int = 0
    duplicates: int = 0
    dropped: int = 0
    rejected: int = 0
    write_errors: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (level, text) to log
    notable: list[Row] = field(default_factory=list)

    def payload(self, degraded: bool) -> dict[str, Any]:
        notable = [{**row, "occurred_at": row["occurred_at"].timestamp()} for row in self.notable]
        return {
            "acked": self.acked,
            "recorded": [[kind, verdict, n] for (kind, verdict), n in self.recorded.items()],
            "writes": self.writes,
            "journaled": self.journaled,
            "replayed": self.replayed,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "write_errors": self.write_errors,
            "problems": self.problems,
            "degraded": degraded,
            "notable": notable,
        }

    def __bool__(self) -> bool:
        return bool(
            self.acked or self.writes or self.write_errors or self.rejected or self.problems
        )


class WriterLoop:
    """Write or journal batches, probe while the database is down, replay the journal."""

    def __init__(self, store: BatchStore, journal: Journal) -> None:
        self.store = store
        self.journal = journal
        self.degraded = False
        self.report = Report()
        self._next_probe = 0.0
        self._replay_needed = True
        self._next_scan = time.monotonic() + REPLAY_SCAN_INTERVAL

    def batches(self, batches: list[tuple[int, str, int, list[RawEvent]]]) -> None:
        """Write (or journal) batches from the receiver, then acknowledge them.

        Batches that arrived together share a transaction, up to
        ``MERGED_BATCHES`` of them: a writer that fell behind catches up with
        fewer, larger commits.
        """
        ids: list[int] = []
        events: list[KeyedEvent] = []
        for batch_id, prefix, first, raw in batches:
            ids.append(batch_id)
            events += keyed(prefix, first, raw)
            if len(ids) == MERGED_BATCHES:
                self._store(ids, events)
                ids, events = [], []
        if ids:
            self._store(ids, events)

    def _store(self, ids: list[int], events: list[KeyedEvent]) -> None:
        try:
            if not self.degraded:
                try:
                    self._write(events)
                except DatabaseUnavailable as exc:
                    self._degrade(exc)
                    self._spill(events)
            else:
                self._spill(events)
        except Exception:  # a bug: count the events lost rather than crash on them again
            log.exception("event writer: %d events failed", len(events))
            self.report.dropped += len(events)
            self.report.problems.append((logging.ERROR, f"{len(events)} hits lost (a bug)"))
        self.report.acked += ids

    def tick(self, stopping: bool = False) -> None:
        """Between batches: probe the database while down, replay a slice of the journal."""
        if stopping:
            return
        try:
            self._tick()
        except Exception:  # never let the writer die: the next round retries
            log.exception("event writer: replaying the journal failed")
            self._replay_needed = False  # until the next scan

    def _tick(self) -> None:
        now = time.monotonic()
        if self.degraded and now >= self._next_probe:
            self.journal.seal()  # probe by trying for real: the next slice of the journal
            self.degraded = False
            self._replay_needed = True
        if now >= self._next_scan:  # files a dead process left behind
            self._next_scan = now + REPLAY_SCAN_INTERVAL
            self._replay_needed = True
        if not self.degraded and self._replay_needed:
            self._replay_slice()

    @property
    def busy(self) -> bool:
        """More journal to replay right away (the caller should not wait for input)."""
        return not self.degraded and self._replay_needed

    def _degrade(self, exc: Exception) -> None:
        self.report.write_errors += 1
        if not self.degraded:
            problem = f"database unavailable, journaling events: {exc}"
            self.report.problems.append((logging.WARNING, problem))
        self.degraded = True
        self._next_probe = time.monotonic() + PROBE_INTERVAL

    def _spill(self, events: list[KeyedEvent]) -> None:
        written, error = self.journal.append_what_fits([to_record(event) for event in events])
        self.report.journaled += written
        if written < len(events):
            self.report.dropped += len(events) - written
            problem = f"cannot write the event journal: {len(events) - written} hits lost ({error})"
            self.report.problems.append((logging.ERROR, problem))

    def _replay_slice(self) -> None:
        records = self.journal.read_slice(REPLAY_SLICE)
        if not records:
            self._replay_needed = False
            return
        events: list[KeyedEvent] = []
        unreadable: list[dict[str, Any]] = []
        for record in records:
            try:
                events.append(from_record(record))
            except (KeyError, TypeError, ValueError):
                unreadable.append(record)
        try:
            self._write(events, replay=True)
        except DatabaseUnavailable as exc:
            self._degrade(exc)
            return
        if unreadable:
            problem = f"journal: {len(unreadable)} unreadable events set aside"
            self.report.problems.append((logging.ERROR, problem))
            self.report.rejected += len(unreadable)
            self.journal.append_rejected(unreadable)
        self.journal.commit_slice()

    def _write(self, events: list[KeyedEvent], replay: bool = False) -> None:
        if not events:
            return
        started = time.perf_counter()
        written = self.store.write(events, replay)
        report = self.report
        report.writes.append(time.perf_counter() - started)
        report.recorded.update(written.recorded)
        if replay:
            report.replayed += written.inserted
            report.duplicates += written.duplicates
        if written.rejected:
            report.rejected += len(written.rejected)
            self.journal.append_rejected([to_record(event) for event in written.rejected])
        if written.inserted:
            opens = sum(n for (kind, _), n in written.recorded.items() if kind == "open")
            log.info(
                "recorded %d events (%d opens, %d clicks)%s",
                written.inserted,
                opens,
                written.inserted - opens,
                " from the journal" if replay else "",
            )
        report.notable += written.notable

    def take_report(self) -> dict[str, Any]:
        report, self.report = self.report, Report()
        return report.payload(self.degraded)


class FrameReader:
    """Frames from a file descriptor (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.closed = False

    def read(self, timeout: float | None) -> list[Any]:
        """The frames that arrive within ``timeout`` s (all those already there, at least)."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        while readable:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
            readable, _, _ = select.select([self.fd], [], [], 0)
        frames = []
        view = memoryview(self.buffer)
        start = 0
        while len(view) - start >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(view, start)
            end = start + FRAME_HEADER.size + size
            if end > len(view):
                break
            frames.append(marshal.loads(view[start + FRAME_HEADER.size : end]))  # noqa: S302
            start = end
        view.release()
        del self.buffer[:start]
        return frames


class Reports:
    """Frames to the receiver; if it is gone (killed), the writer carries on without."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, payload: Any) -> None:
        if self.fd is None:
            return
        data = memoryview(frame(payload))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:  # EPIPE: nobody reads reports any more; the batches still count
            self.fd = None


def main() -> int:
    """``python -m receiver.eventstore``: run until stdin closes (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reports = Reports(os.dup(1))
    os.dup2(2, 1)  # a stray print must not corrupt the frames
    inbox = FrameReader(0)
    while not (frames := inbox.read(None)) and not inbox.closed:
        pass
    if not frames:
        return 0
    config, pending = frames[0], frames[1:]
    logging.basicConfig(
        level=config["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    base = db.make_engine(config["database_url"])
    # A locked SQLite file sends the batch to the journal soon, not after 30 s.
    engine = db.impatient_engine(base, SQLITE_WRITE_TIMEOUT)
    if engine is not base:
        base.dispose()
    store = BatchStore(engine, config["store_full_ip"], notify_email=config["notify_email"])
    loop = WriterLoop(store, Journal(Path(config["journal_dir"])))
    reports.send({"ready": os.getpid()})
    interval = float(config["flush_interval"])
    told_degraded = False
    try:
        while True:
            loop.batches([message[1:] for message in pending])
            loop.tick(stopping=inbox.closed)
            if loop.report or loop.degraded != told_degraded:
                told_degraded = loop.degraded
                reports.send(loop.take_report())
            if inbox.closed:
                return 0
            pending = inbox.read(0 if loop.busy else interval)
    finally:
        loop.journal.close()
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())

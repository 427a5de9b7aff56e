"""Record hits without ever making a request wait on the database.

The road of one hit::

    request -> new_event(): a plain tuple -> EventWriter.submit()   (a list append)
            ... every event_flush_interval s, or at event_batch_size pending ...
    writer task: give each event its unique key, then in a thread
                 (asyncio.to_thread) BatchStore.write(): look up the messages of
                 the batch, classify (receiver/classify.py), INSERT ... ON CONFLICT
                 DO NOTHING, outbox rows for the hits that notify (shared/outbox.py)
            -> on_written listeners (dashboard live feed) with those rows

Everything that does not change the response happens in the writer, once per
batch where it can: the request only verifies the token and appends a tuple.
The writer shares the process (and its GIL) with the requests, so each batch
is made cheap rather than moved away: a verdict is worked out once per distinct
(user agent, IP, ...) and remembered; SQLite gets a few multi-row INSERTs per
batch (one GIL release each, where ``executemany`` hands the GIL back and forth
once per row), PostgreSQL one ``unnest`` of column arrays; dictionaries are
built only for the few rows someone is notified about.

If the database cannot be written, the batch is appended to a journal file
under ``<var_dir>/journal/`` (JSON lines, fsynced, mode 0600) and the writer
keeps journaling until a probe write succeeds (every ``PROBE_INTERVAL`` s).
Journal files are then replayed a slice at a time between live batches, and a
file is deleted only after its last row is committed. A restart replays what
the journal holds. Every event gets a unique ``event_key`` before its first
write attempt, so a replay that repeats rows (a crash between commit and
delete, an ambiguous commit) is absorbed by the unique constraint: each hit is
stored exactly once.

What a crash (SIGKILL, power loss) can lose: the events still in memory — at
most ``event_flush_interval`` seconds of hits (``TRACKRELAY_EVENT_FLUSH_INTERVAL``,
default 0.1 s) plus the batch being written; while the database is unreachable,
also the hits that arrive during one failed write attempt (for SQLite, up to
``SQLITE_WRITE_TIMEOUT`` s). Nothing already in the journal is lost.

Journal files (shared/journal.py) are per process
(``events-<pid>-<n>-<random>.jsonl``) and held with ``flock`` while written:
with several workers, each replays its own files and those of dead
processes, never a live sibling's. If the journal cannot be written either
(disk full), pixels and redirects are still served: the batch is dropped,
logged at ERROR and counted in ``trackrelay_events_dropped_total``.

The journal keeps the full client IP until replay, because the "sender" rule
compares it with the IP that submitted the message; the database gets the truncated IP (/24, /48)
unless ``TRACKRELAY_STORE_FULL_IP`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import operator
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Insert, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from receiver.classify import VERDICTS, Hit, classify
from receiver.metrics import Metrics
from shared import journal as shared_journal
from shared.config import Settings
from shared.models import Event, Message
from shared.outbox import enqueue_for_events, may_notify

log = logging.getLogger(__name__)

#: Seconds between attempts to write again while the database is down.
PROBE_INTERVAL = 1.0
#: SQLite: how long one batch waits for the write lock before journaling.
SQLITE_WRITE_TIMEOUT = 2.0
#: Events held in memory at most; beyond, hits are dropped (and counted).
MAX_PENDING = 200_000
#: Journal rows replayed per writer tick, between live batches.
REPLAY_SLICE = 2000
MAX_USER_AGENT = 1024
#: Distinct (user agent, IP, ...) verdicts remembered by the writer.
VERDICT_CACHE_SIZE = 65536
#: SQLite: rows per INSERT at most (11 columns: far below the 32766 variables limit).
SQLITE_ROWS_PER_INSERT = 512

EVENTS: Table = Event.__table__  # type: ignore[attr-defined]
MESSAGES: Table = Message.__table__  # type: ignore[attr-defined]

Row = dict[str, Any]
OnWritten = Callable[[list[Row]], Awaitable[None]]

#: What a request hands to the writer: (occurred_at, kind, message_id,
#: recipient_position, link_position, ip, user_agent, method, purpose,
#: dashboard_user). A tuple: building it costs a tenth of a dict.
RawEvent = tuple[float, str, int, int, int, str, str, str, str, bool]
#: A raw event with its unique ``event_key`` in front: what is written, journaled, replayed.
KeyedEvent = tuple[str, float, str, int, int, int, str, str, str, str, bool]
#: The journal's field names for a KeyedEvent, in its order (the journal holds JSON objects).
RECORD_FIELDS = (
    "event_key",
    "occurred_at",
    "kind",
    "message_id",
    "recipient_position",
    "link_position",
    "ip",
    "user_agent",
    "method",
    "purpose",
    "dashboard_user",
)


def new_event(
    kind: str,
    message_id: int,
    recipient: int,
    link: int,
    ip: str,
    user_agent: str,
    method: str,
    purpose: str = "",
    dashboard_user: bool = False,
) -> RawEvent:
    """A raw event as the request saw it; the writer keys and classifies it."""
    return (
        time.time(),
        kind,
        message_id,
        recipient,
        link,
        ip,
        user_agent[:MAX_USER_AGENT],
        method,
        purpose,
        dashboard_user,
    )


class _EventKeys:
    """Unique event keys without a syscall per hit.

    ``os.urandom`` costs ~100 us on some VMs — more than the rest of a pixel
    request. A key is a random 64-bit per-process prefix and a counter: unique
    within a process, and across processes and restarts with overwhelming odds.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a worker never reuses a prefix

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"

    def assign(self, events: Iterable[RawEvent]) -> list[KeyedEvent]:
        template = self._prefix + "%016x"  # %-formatting: a third cheaper than an f-string
        pairs = zip(events, self._counter, strict=False)
        return [(template % n,) + event for event, n in pairs]  # noqa: RUF005 - faster than *


_keys = _EventKeys()


def to_record(event: KeyedEvent) -> dict[str, Any]:
    """A keyed event as the journal stores it (a JSON object, as always)."""
    return dict(zip(RECORD_FIELDS, event, strict=True))


def from_record(record: dict[str, Any]) -> KeyedEvent:
    """A journal record back as a keyed event; KeyError/TypeError/ValueError if malformed."""
    return (
        str(record["event_key"]),
        float(record["occurred_at"]),
        str(record["kind"]),
        int(record["message_id"]),
        int(record["recipient_position"]),
        int(record["link_position"]),
        str(record["ip"]),
        str(record["user_agent"]),
        str(record["method"]),
        str(record.get("purpose", "")),
        bool(record.get("dashboard_user")),
    )


@functools.lru_cache(maxsize=65536)
def truncate_ip(ip: str, full: bool = False) -> str:
    """``203.0.113.0/24`` / ``2001:db8:1::/48`` by default; the address when ``full``."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if full:
        return str(address)
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def insert_ignoring(table: Table, key: str, dialect: str) -> Insert:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` for SQLite and PostgreSQL."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])
    raise ValueError(f"unsupported database: {dialect}")


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
    """The synchronous database side: classify and insert one batch (run in a thread).

    Calls are serialised by the writer task (one batch at a time).
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
        self._values_row = f"({', '.join([marker] * len(COLUMNS))})"
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
        with self.engine.begin() as conn, self._sqlite_timeout(conn):
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

    @contextlib.contextmanager
    def _sqlite_timeout(self, conn: Connection) -> Iterator[None]:
        """A locked SQLite file must send the batch to the journal soon, not in 30 s."""
        if self.dialect != "sqlite":
            yield
            return
        before = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(SQLITE_WRITE_TIMEOUT * 1000)}")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(before or 0)}")

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
        found: dict[int, _MessageFacts] = {}
        wanted = sorted(ids)
        for start in range(0, len(wanted), 500):
            query = select(MESSAGES.c.id, MESSAGES.c.created_at, MESSAGES.c.client_ip).where(
                MESSAGES.c.id.in_(wanted[start : start + 500])
            )
            for id_, created_at, client_ip in conn.execute(query):
                if created_at.tzinfo is None:
                    created_at = created_at.replace(tzinfo=UTC)
                found[id_] = _MessageFacts(created_at.timestamp(), client_ip or "")
        return found


class Journal(shared_journal.Journal):
    """The receiver's event journal: ``events-<pid>-<n>-<random>.jsonl`` files."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, prefix="events")


class EventWriter:
    """The in-memory queue and the task that writes it (see the module docstring)."""

    def __init__(
        self, settings: Settings, metrics: Metrics, on_written: OnWritten | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.journal = Journal(settings.var_dir / "journal")
        self.listeners: list[OnWritten] = [on_written] if on_written else []
        self.degraded = False
        self._pending: list[RawEvent] = []
        self._wake = asyncio.Event()
        self._store: BatchStore | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_probe = 0.0
        self._replay_needed = True
        self._notifications: set[asyncio.Future[None]] = set()
        self._last_drop_log = 0.0

    # --- the request side ---

    def submit(self, event: RawEvent) -> None:
        """Queue one event (see :func:`new_event`). O(1); never touches the database or the disk."""
        if len(self._pending) >= MAX_PENDING:
            self.metrics.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.error("event queue full (%d): dropping hits", MAX_PENDING)
            return
        self._pending.append(event)
        if len(self._pending) >= self.settings.event_batch_size:
            self._wake.set()

    @property
    def depth(self) -> int:
        return len(self._pending)

    def subscribe(self, listener: OnWritten) -> None:
        """Call ``listener(rows)`` after each committed batch.

        ``rows`` are the inserted rows that may notify someone (shared/outbox.py
        ``may_notify``: human and proxy hits, machine opens, unknown clicks) as
        dictionaries of the events table's columns; scanner and self hits are
        only counted. A batch without such rows calls no listener.
        """
        self.listeners.append(listener)

    # --- lifecycle ---

    async def start(self, engine: Engine) -> None:
        self._store = BatchStore(
            engine, self.settings.store_full_ip, notify_email=bool(self.settings.notify_from)
        )
        self._task = asyncio.create_task(self._run(), name="trackrelay-event-writer")

    async def stop(self) -> None:
        """Write (or journal) everything still queued, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)
        self.journal.close()

    async def _run(self) -> None:
        interval = self.settings.event_flush_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # never let the writer die: the next tick retries
                log.exception("event writer tick failed")
            if self._stopping and not self._pending:
                return

    async def _tick(self) -> None:
        batch, self._pending = self._pending, []
        size = self.settings.event_batch_size
        for start in range(0, len(batch), size):
            # Keyed before the first attempt: a retry from the journal reuses the key.
            await self._flush(_keys.assign(batch[start : start + size]))
        if self.degraded and time.monotonic() >= self._next_probe and not self._stopping:
            # Probe by trying for real: the next slice of the journal.
            await asyncio.to_thread(self.journal.seal)
            self.degraded = False
            self._replay_needed = True
        if not self.degraded and self._replay_needed and not self._stopping:
            await self._replay_slice()

    async def _flush(self, batch: list[KeyedEvent]) -> None:
        if not self.degraded:
            try:
                await self._write(batch)
                return
            except DatabaseUnavailable as exc:
                self._degrade(exc)
        await self._spill(batch)

    def _degrade(self, exc: Exception) -> None:
        self.metrics.write_errors += 1
        if not self.degraded:
            log.warning("database unavailable, journaling events: %s", exc)
        self.degraded = True
        self._next_probe = time.monotonic() + PROBE_INTERVAL

    async def _spill(self, batch: list[KeyedEvent]) -> None:
        written, error = await asyncio.to_thread(self._journal_events, batch)
        self.metrics.journaled += written
        if written < len(batch):
            self.metrics.dropped += len(batch) - written
            log.error(
                "cannot write the event journal: %d hits lost (%s)", len(batch) - written, error
            )

    def _journal_events(self, batch: list[KeyedEvent]) -> tuple[int, OSError | None]:
        return self.journal.append_what_fits([to_record(event) for event in batch])

    async def _replay_slice(self) -> None:
        records = await asyncio.to_thread(self.journal.read_slice, REPLAY_SLICE)
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
            await self._write(events, replay=True)
        except DatabaseUnavailable as exc:
            self._degrade(exc)
            return
        if unreadable:
            log.error("journal: %d unreadable events set aside", len(unreadable))
            self.metrics.rejected += len(unreadable)
            await asyncio.to_thread(self.journal.append_rejected, unreadable)
        await asyncio.to_thread(self.journal.commit_slice)

    async def _write(self, events: list[KeyedEvent], replay: bool = False) -> None:
        assert self._store is not None
        if not events:
            return
        started = time.perf_counter()
        written = await asyncio.to_thread(self._store.write, events, replay)
        self.metrics.observe_write(time.perf_counter() - started)
        self.metrics.recorded.update(written.recorded)
        if replay:
            self.metrics.replayed += written.inserted
            self.metrics.duplicates += written.duplicates
        if written.rejected:
            self.metrics.rejected += len(written.rejected)
            rejected = [to_record(event) for event in written.rejected]
            await asyncio.to_thread(self.journal.append_rejected, rejected)
        if written.inserted:
            opens = sum(n for (kind, _), n in written.recorded.items() if kind == "open")
            log.info(
                "recorded %d events (%d opens, %d clicks)%s",
                written.inserted,
                opens,
                written.inserted - opens,
                " from the journal" if replay else "",
            )
        if written.notable:
            self._notify(written.notable)

    def _notify(self, rows: list[Row]) -> None:
        for listener in self.listeners:
            task: asyncio.Future[None] = asyncio.ensure_future(listener(rows))
            self._notifications.add(task)
            task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Future[None]) -> None:
        self._notifications.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an on_written listener failed", exc_info=task.exception())

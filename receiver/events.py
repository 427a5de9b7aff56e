"""Record hits without ever making a request wait on the database.

The road of one hit::

    request -> new_event() -> EventWriter.submit()   (a list append, nothing else)
            ... every event_flush_interval s, or at event_batch_size pending ...
    writer task -> asyncio.to_thread(write): look up the messages of the batch,
                   classify (receiver/classify.py), INSERT ... ON CONFLICT DO NOTHING
            -> on_written listeners (dashboard live feed, webhooks)

If the database cannot be written, the batch is appended to a journal file
under ``<var_dir>/journal/`` (JSON lines, fsynced, mode 0600) and the writer
keeps journaling until a probe write succeeds (every ``PROBE_INTERVAL`` s).
Journal files are then replayed a slice at a time between live batches, and a
file is deleted only after its last row is committed. A restart replays what
the journal holds. Every event has a unique ``event_key``, so a replay
that repeats rows (a crash between commit and delete, an ambiguous commit) is
absorbed by the unique constraint: each hit is stored exactly once.

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
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Insert, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from receiver.classify import Hit, classify
from receiver.metrics import Metrics
from shared import journal as shared_journal
from shared.config import Settings
from shared.models import Event, Message
from shared.outbox import enqueue_for_events

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

EVENTS: Table = Event.__table__  # type: ignore[attr-defined]
MESSAGES: Table = Message.__table__  # type: ignore[attr-defined]

Row = dict[str, Any]
OnWritten = Callable[[list[Row]], Awaitable[None]]


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


_keys = _EventKeys()


def new_event(
    *,
    kind: str,
    message_id: int,
    recipient: int,
    link: int,
    ip: str,
    user_agent: str,
    method: str,
    purpose: str = "",
    dashboard_user: bool = False,
) -> Row:
    """A raw event as the request saw it; the writer classifies it."""
    return {
        "event_key": _keys.next(),
        "kind": kind,
        "message_id": message_id,
        "recipient_position": recipient,
        "link_position": link,
        "occurred_at": time.time(),
        "ip": ip,
        "user_agent": user_agent[:MAX_USER_AGENT],
        "method": method,
        "purpose": purpose,
        "dashboard_user": dashboard_user,
    }


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


class DatabaseUnavailable(Exception):
    """A batch could not be written; it goes to the journal."""


@dataclass
class _MessageFacts:
    created_at: datetime
    client_ip: str


class BatchStore:
    """The synchronous database side: classify and insert one batch (run in a thread)."""

    def __init__(self, engine: Engine, store_full_ip: bool, notify_email: bool = False) -> None:
        self.engine = engine
        self.store_full_ip = store_full_ip
        self.notify_email = notify_email
        self.dialect = engine.dialect.name
        # Replays may repeat rows: RETURNING tells which ones were new.
        self.insert = insert_ignoring(EVENTS, "event_key", self.dialect).returning(
            EVENTS.c.event_key
        )
        # SQLite live batches cannot repeat (fresh keys): a plain executemany,
        # which sqlite3 runs in C, skips SQLAlchemy's per-row parameter work.
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._fast_sql = (
            f"INSERT INTO {EVENTS.name} ({', '.join(COLUMNS)}) "  # noqa: S608 - constants
            f"VALUES ({', '.join([marker] * len(COLUMNS))}) "
            "ON CONFLICT (event_key) DO NOTHING"
        )
        casts = ", ".join(f"%s::{PG_TYPES[c]}[]" for c in COLUMNS)
        self._unnest_sql = (
            f"INSERT INTO {EVENTS.name} ({', '.join(COLUMNS)}) SELECT * FROM unnest({casts}) "  # noqa: S608
            "ON CONFLICT (event_key) DO NOTHING RETURNING event_key"
        )
        self._bind_time = EVENTS.c.occurred_at.type.dialect_impl(engine.dialect).bind_processor(
            engine.dialect
        )

    def write(self, events: list[Row], replay: bool = False) -> tuple[list[Row], int, list[Row]]:
        """Insert ``events``; return (rows inserted, duplicates skipped, events rejected).

        Raises DatabaseUnavailable when the batch could not be written at all.
        """
        try:
            try:
                with self.engine.begin() as conn, self._sqlite_timeout(conn):
                    rows = self.rows(conn, events)
                    if self.dialect == "postgresql":
                        inserted = self._insert_unnest(conn, rows)
                    elif replay:
                        inserted = self._insert(conn, rows)
                    else:
                        inserted = self._insert_fast(conn, rows)
                    # Webhook and mail notifications commit with their events.
                    enqueue_for_events(conn, inserted, notify_email=self.notify_email)
                return inserted, len(rows) - len(inserted), []
            except (DataError, IntegrityError):
                log.exception("the database refused a batch; writing it row by row")
                return self._one_by_one(events)
        except Exception as exc:
            raise DatabaseUnavailable(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc

    def _insert(self, conn: Connection, rows: list[Row]) -> list[Row]:
        new = set(conn.execute(self.insert, rows).scalars())
        return [row for row in rows if row["event_key"] in new]

    def _insert_unnest(self, conn: Connection, rows: list[Row]) -> list[Row]:
        """PostgreSQL: one statement, one array per column.

        SQLAlchemy's multi-row VALUES makes psycopg parse a statement with
        thousands of placeholders on every batch, and psycopg's executemany
        costs a round trip per row; ``unnest`` of arrays costs neither.
        """
        columns = [[row[c] for row in rows] for c in COLUMNS]
        new = set(conn.exec_driver_sql(self._unnest_sql, tuple(columns)).scalars())
        return [row for row in rows if row["event_key"] in new]

    def _insert_fast(self, conn: Connection, rows: list[Row]) -> list[Row]:
        bind = self._bind_time
        params = [
            tuple(bind(row[c]) if c == "occurred_at" and bind else row[c] for c in COLUMNS)
            for row in rows
        ]
        result = conn.exec_driver_sql(self._fast_sql, params)
        if result.rowcount == len(rows):
            return rows
        # Some keys were already there (cannot happen for fresh events): find which.
        return self._insert(conn, rows)

    def _one_by_one(self, events: list[Row]) -> tuple[list[Row], int, list[Row]]:
        """A batch with a bad row: keep the good ones, set the bad ones aside."""
        inserted: list[Row] = []
        rejected: list[Row] = []
        duplicates = 0
        for event in events:
            try:
                with self.engine.begin() as conn:
                    done = self._insert(conn, self.rows(conn, [event]))
                    enqueue_for_events(conn, done, notify_email=self.notify_email)
            except (DataError, IntegrityError):
                rejected.append(event)
                continue
            inserted += done
            duplicates += 1 - len(done)
        return inserted, duplicates, rejected

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

    def rows(self, conn: Connection, events: list[Row]) -> list[Row]:
        facts = self._message_facts(conn, {e["message_id"] for e in events})
        return [self.row(e, facts.get(e["message_id"])) for e in events]

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
                found[id_] = _MessageFacts(created_at, client_ip or "")
        return found

    def row(self, event: Row, facts: _MessageFacts | None) -> Row:
        occurred = float(event["occurred_at"])
        hit = Hit(
            kind=event["kind"],
            method=event["method"],
            user_agent=event["user_agent"],
            ip=event["ip"],
            purpose=event.get("purpose", ""),
            dashboard_user=bool(event.get("dashboard_user")),
            # Only click rules look at the send time; leaving it out of opens lets
            # classify() answer repeated hits from its cache.
            seconds_after_send=(
                occurred - facts.created_at.timestamp()
                if facts and event["kind"] == "click"
                else None
            ),
            sender_ip=facts.client_ip if facts else "",
        )
        verdict = classify(hit)
        return {
            "event_key": event["event_key"],
            "message_id": event["message_id"],
            "recipient_position": event["recipient_position"],
            "link_position": event["link_position"],
            "kind": event["kind"],
            "occurred_at": datetime.fromtimestamp(occurred, UTC),
            "ip": truncate_ip(event["ip"], self.store_full_ip),
            "user_agent": event["user_agent"],
            "method": event["method"],
            "verdict": verdict.verdict,
            "reasons": verdict.reason_text,
        }


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
        self._pending: list[Row] = []
        self._wake = asyncio.Event()
        self._store: BatchStore | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_probe = 0.0
        self._replay_needed = True
        self._notifications: set[asyncio.Future[None]] = set()
        self._last_drop_log = 0.0

    # --- the request side ---

    def submit(self, event: Row) -> None:
        """Queue one event. O(1); never touches the database or the disk."""
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
        """Call ``listener(rows)`` after each committed batch (rows as inserted)."""
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
        for start in range(0, len(batch), self.settings.event_batch_size):
            await self._flush(batch[start : start + self.settings.event_batch_size])
        if self.degraded and time.monotonic() >= self._next_probe and not self._stopping:
            # Probe by trying for real: the next slice of the journal.
            await asyncio.to_thread(self.journal.seal)
            self.degraded = False
            self._replay_needed = True
        if not self.degraded and self._replay_needed and not self._stopping:
            await self._replay_slice()

    async def _flush(self, batch: list[Row]) -> None:
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

    async def _spill(self, batch: list[Row]) -> None:
        written, error = await asyncio.to_thread(self.journal.append_what_fits, batch)
        self.metrics.journaled += written
        if written < len(batch):
            self.metrics.dropped += len(batch) - written
            log.error(
                "cannot write the event journal: %d hits lost (%s)", len(batch) - written, error
            )

    async def _replay_slice(self) -> None:
        events = await asyncio.to_thread(self.journal.read_slice, REPLAY_SLICE)
        if not events:
            self._replay_needed = False
            return
        try:
            await self._write(events, replay=True)
        except DatabaseUnavailable as exc:
            self._degrade(exc)
            return
        await asyncio.to_thread(self.journal.commit_slice)

    async def _write(self, events: list[Row], replay: bool = False) -> None:
        assert self._store is not None
        started = time.perf_counter()
        rows, duplicates, rejected = await asyncio.to_thread(self._store.write, events, replay)
        self.metrics.observe_write(time.perf_counter() - started)
        for row in rows:
            self.metrics.recorded[row["kind"], row["verdict"]] += 1
        if replay:
            self.metrics.replayed += len(rows)
            self.metrics.duplicates += duplicates
        if rejected:
            self.metrics.rejected += len(rejected)
            await asyncio.to_thread(self.journal.append_rejected, rejected)
        if rows:
            opens = sum(1 for row in rows if row["kind"] == "open")
            log.info(
                "recorded %d events (%d opens, %d clicks)%s",
                len(rows),
                opens,
                len(rows) - opens,
                " from the journal" if replay else "",
            )
            self._notify(rows)

    def _notify(self, rows: list[Row]) -> None:
        for listener in self.listeners:
            task: asyncio.Future[None] = asyncio.ensure_future(listener(rows))
            self._notifications.add(task)
            task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Future[None]) -> None:
        self._notifications.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an on_written listener failed", exc_info=task.exception())

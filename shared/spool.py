"""One durability loop for every writer: commit a batch, or journal it and replay it later.

The relay's message records (relay/record.py), the receiver's events
(receiver/eventstore.py) and, next, the intake writer's replies and bounces
must each reach the database exactly once, must never make the one who
produced them wait on (or fail because of) a database that is down, and must
not be lost. The steps are the same for all of them, so they live here once;
a side only says what its batch write is (a :class:`Store`)::

    Spool.write(items)                one live batch
        degraded?                     -> the journal (Store.to_record), no database call
        Store.write(items)            one transaction -> committed
        refused as invalid            (DataError, IntegrityError, Invalid): item by item;
                                      what the database refuses alone is set aside
                                      (rejected-<prefix>.jsonl, kept for a human, never replayed)
        any other failure             the database is unavailable: degraded, the batch journaled
        the journal fails too         (disk full) the items are lost and counted, never silently
    Spool.tick()                      between live batches
        every PROBE_INTERVAL s while degraded: seal our own journal file and replay its
            first slice: that is the probe (a write for real, not a ping)
        every scan_interval s: look for files that dead processes left
        a replay round goes on, one slice (one transaction) per tick, until the journal is empty

Replays are made harmless by the stores (unique keys: a record stored twice is
skipped), because a crash between a commit and the journal's delete replays
records that are already in.

Why synchronous: the receiver's writer is a separate process with no event
loop (its module docstring says why); the relay calls the same core from its
asyncio writer task through shared/groupcommit.py, one ``asyncio.to_thread``
per batch. A Spool is used by one caller at a time (the journal is not
thread-safe); the decisions (degrade, when to probe, what to replay, what to
set aside, what is lost) and the figures (:class:`Counters`) are the same on
both sides. Everything a side reports (log lines, the receiver's report to its
parent process) it says in the :class:`Store` hooks, in its own words.

Nothing here costs per item on the way to a commit: items are passed as they
are; only journaling converts them to records.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass
from typing import Generic, TypeVar

from sqlalchemy.exc import DataError, IntegrityError

from shared.journal import Journal, Record

log = logging.getLogger(__name__)

#: Seconds between probes (a replay attempt) while the database is unavailable.
PROBE_INTERVAL = 1.0
#: SQLite: how long a writer's batch waits for the write lock before it is journaled
#: (shared/db.py ``impatient_engine``); every other user of the file waits 30 s.
SQLITE_WRITE_TIMEOUT = 2.0

Item = TypeVar("Item")


class Invalid(Exception):
    """Raised by :meth:`Store.write`: the batch holds an item that can never be stored."""


#: What a store raises for a batch the database will never take, whatever the retry.
REFUSED = (DataError, IntegrityError, Invalid)
#: What :meth:`Store.from_record` raises for a journal record it cannot read.
UNREADABLE = (KeyError, TypeError, ValueError)


def first_line(error: BaseException) -> str:
    """An error for a log line: its message's first line, or its type's name."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Counters:
    """What a spool did since it started (items, except ``batches`` and ``failures``)."""

    batches: int = 0  # live batches committed ...
    written: int = 0  # ... and the new items they stored
    replayed: int = 0  # journaled items stored on replay
    journaled: int = 0  # items appended to the journal
    lost: int = 0  # items neither stored nor journaled (the journal failed too)
    set_aside: int = 0  # items or journal records refused as invalid
    failures: int = 0  # writes that found the database unavailable

    def since(self, before: Counters) -> Counters:
        """The difference from an earlier copy (``dataclasses.replace(counts)``)."""
        pairs = zip(astuple(self), astuple(before), strict=True)
        return Counters(*(now - then for now, then in pairs))


class Store(ABC, Generic[Item]):
    """What one side writes, and how it tells what happened (the hooks; silent by default).

    The spool calls every method in its caller's thread, one call at a time.
    """

    @abstractmethod
    def write(self, items: list[Item], replay: bool) -> int:
        """Store ``items`` in ONE transaction; return how many were new.

        ``replay``: they come from the journal (some may be stored already).
        Raise one of :data:`REFUSED` when the database refuses the batch as
        invalid (the spool retries item by item); anything else raised means
        the database is unavailable, and nothing of the batch was committed.
        """

    @abstractmethod
    def to_record(self, item: Item) -> Record:
        """``item`` as the journal keeps it (JSON)."""

    @abstractmethod
    def from_record(self, record: Record) -> Item:
        """A journal record back as an item; one of :data:`UNREADABLE` if it is not one."""

    def committed(self, stored: int, replay: bool, seconds: float) -> None:
        """A batch (live, or a journal slice) is committed; ``stored`` of it were new."""

    def unavailable(self, error: Exception, items: list[Item], first: bool) -> None:
        """A write failed: the database is unavailable (``first``: it was not before).

        ``items``: the live batch that goes to the journal ([] for a replay).
        """

    def journaled(self, items: list[Item]) -> None:
        """``items`` are in the journal."""

    def lost(self, items: list[Item], error: BaseException | None) -> None:
        """``items`` could not be journaled either: they are lost."""

    def refusing(self, count: int, error: Exception) -> None:
        """The database refused a batch of ``count`` as invalid: writing it item by item."""

    def set_aside(self, records: list[Record], error: BaseException, unreadable: bool) -> None:
        """``records`` are refused (``unreadable``: journal lines) and go to the rejected file."""

    def replayed_all(self, stored: int) -> None:
        """A replay round emptied the journal, storing ``stored`` items."""

    def close(self) -> None:
        """Release what the store holds (its own engine); called once its writer stopped."""


class Spool(Generic[Item]):
    """The synchronous core (module docstring): live batches, probes, replays, set-asides."""

    def __init__(
        self,
        store: Store[Item],
        journal: Journal,
        *,
        replay_slice: int,
        scan_interval: float,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.store = store
        self.journal = journal
        self.replay_slice = replay_slice  # journal records per replay transaction
        self.scan_interval = scan_interval  # seconds between looks for dead processes' files
        self.probe_interval = probe_interval
        self.counts = Counters()
        self.degraded = False  # live batches go straight to the journal
        self._replaying = True  # a new spool first replays what a previous run left
        self._round = 0  # items stored by the current replay round
        now = time.monotonic()
        self._next_probe = now
        self._next_scan = now + scan_interval

    # --- live batches ---

    def write(self, items: list[Item]) -> None:
        """Commit one live batch, or journal it; raises only for a bug in a hook."""
        if not items:
            return
        if not self.degraded:
            try:
                stored = self._commit(items, replay=False)
            except Exception as exc:
                self._degrade(exc, items)
            else:
                self.counts.batches += 1
                self.counts.written += stored
                return
        self._journal(items)

    def _commit(self, items: list[Item], replay: bool) -> int:
        started = time.perf_counter()
        store = self.store
        try:
            stored = store.write(items, replay)
        except REFUSED as exc:
            stored = self._one_by_one(items, replay, exc)
        store.committed(stored, replay, time.perf_counter() - started)
        return stored

    def _one_by_one(self, items: list[Item], replay: bool, error: Exception) -> int:
        """A batch with an invalid item: store the others, set the invalid ones aside."""
        store = self.store
        if len(items) == 1:
            self._set_aside([store.to_record(items[0])], error)
            return 0
        store.refusing(len(items), error)
        stored = 0
        for item in items:
            try:
                stored += store.write([item], replay)
            except REFUSED as exc:
                self._set_aside([store.to_record(item)], exc)
        return stored

    def _degrade(self, error: Exception, items: list[Item]) -> None:
        self.counts.failures += 1
        self.store.unavailable(error, items, first=not self.degraded)
        self.degraded = True
        self._next_probe = time.monotonic() + self.probe_interval

    def _journal(self, items: list[Item]) -> None:
        error: BaseException | None
        try:
            records = [self.store.to_record(item) for item in items]
            written, error = self.journal.append_what_fits(records)
        except Exception as exc:  # not even a bug may lose items without a word
            written, error = 0, exc
        self.counts.journaled += written
        if written:
            self.store.journaled(items[:written])
        if written < len(items):
            self.counts.lost += len(items) - written
            self.store.lost(items[written:], error)

    def _set_aside(
        self, records: list[Record], error: BaseException, unreadable: bool = False
    ) -> None:
        self.counts.set_aside += len(records)
        self.store.set_aside(records, error, unreadable)
        try:
            self.journal.append_rejected(records)
        except OSError:
            log.exception("cannot keep %d refused record(s) in the rejected file", len(records))

    # --- between batches ---

    @property
    def busy(self) -> bool:
        """More journal to replay right away: call :meth:`tick` without waiting."""
        return self._replaying and not self.degraded

    def due_in(self) -> float:
        """Seconds until :meth:`tick` has something to do (0: now). Cheap: no system call
        but the clock."""
        if self.busy:
            return 0.0
        due = min(self._next_scan, self._next_probe) if self.degraded else self._next_scan
        return max(0.0, due - time.monotonic())

    def tick(self) -> None:
        """Probe while degraded, look for dead processes' files, replay one slice; never raises."""
        try:
            now = time.monotonic()
            if now >= self._next_scan:
                self._next_scan = now + self.scan_interval
                self._start_round()
            if self.degraded:
                if now < self._next_probe:
                    return
                self.journal.seal()  # our own file becomes replayable: its first slice probes
                self._start_round()
            if self._replaying:
                self._replay_slice()
        except Exception:  # never let the writer die: the next scan retries
            log.exception("replaying the journal failed")
            self._replaying = False

    def _start_round(self) -> None:
        if not self._replaying:
            self._replaying, self._round = True, 0

    def _replay_slice(self) -> None:
        records = self.journal.read_slice(self.replay_slice)
        if not records:  # the journal is empty: live batches may go to the database
            self._replaying = False
            self.degraded = False
            if self._round:
                self.store.replayed_all(self._round)
            return
        items: list[Item] = []
        unreadable: list[Record] = []
        error: BaseException | None = None
        for record in records:
            try:
                items.append(self.store.from_record(record))
            except UNREADABLE as exc:
                unreadable.append(record)
                error = exc
        try:
            stored = self._commit(items, replay=True) if items else 0
        except Exception as exc:
            self._degrade(exc, [])
            return
        self.degraded = False  # the probe worked: live batches go to the database again
        if unreadable:
            assert error is not None
            self._set_aside(unreadable, error, unreadable=True)
        self.journal.commit_slice()
        self.counts.replayed += stored
        self._round += stored

    def close(self) -> None:
        self.journal.close()

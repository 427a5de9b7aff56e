"""The writer process: classify and store the receiver's events, or journal them.

Every receiver process (``trackrelay receiver``/``serve``, each uvicorn worker)
starts one: ``python -m receiver.eventstore`` (receiver/events.py,
:class:`~receiver.events.EventWriter`). Why a process and not a thread: the
batch write is mostly Python (classifying, binding rows, the outbox); in a
thread it takes the GIL from the event loop that answers pixels, and measured
under load that handing back and forth cost the receiver more CPU per hit than
the write itself. Here it runs beside the requests instead of between them.

It reads frames from stdin and answers on stdout (receiver/frames.py)::

    receiver -> writer   a config dict, then ("batch", id, key prefix, first number, [raw events])
    writer -> receiver   {"acked": [ids], figures for /metrics, "degraded", "notable": [rows]}

For each batch, one transaction (receiver/eventrows.py ``BatchStore``): give
each event its key (prefix + number, chosen by the receiver, so a batch sent
again to a new writer gets the same keys and the unique constraint absorbs a
repeat), classify it (receiver/classify.py), INSERT ... ON CONFLICT DO
NOTHING, and add the outbox rows (shared/outbox.py). Batches that queued up
share a transaction, up to ``MERGED_BATCHES``. If the database cannot be
written, the batch is appended to the journal instead, and the writer keeps
journaling until a probe (every ``PROBE_INTERVAL`` s: a replay attempt)
succeeds; journal files are replayed ``REPLAY_SLICE`` events at a time between
live batches; events the database refuses are set aside. shared/spool.py
``Spool`` makes those decisions (for the relay too); :class:`EventStore` is
what it writes here and how the writer tells the receiver. A batch is
acknowledged once it is committed or journaled (or, journal disk full,
dropped and counted).

SIGINT and SIGTERM are ignored (a Ctrl-C reaches the whole process group): the
writer stops when its stdin closes, after writing or journaling everything it
read — so a receiver killed even by SIGKILL loses nothing it had handed over.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from receiver.eventrecord import (
    JOURNAL_PREFIX,
    KeyedEvent,
    RawEvent,
    Row,
    from_record,
    keyed,
    to_record,
)
from receiver.eventrows import BatchStore, Written
from receiver.frames import FrameReader, Reports
from shared import db
from shared.journal import Journal, Record
from shared.spool import SQLITE_WRITE_TIMEOUT, Counters, Spool, Store, first_line

log = logging.getLogger("receiver.eventstore")  # also when run as __main__

#: Seconds between looks for journal files left by other (dead) processes.
REPLAY_SCAN_INTERVAL = 10.0
#: Batches from the receiver written in one transaction at most, when they queue up.
MERGED_BATCHES = 4
#: Journal rows replayed per writer round, between live batches.
REPLAY_SLICE = 2000


@dataclass
class Report:
    """What the writer tells the receiver after a round (see the module docstring)."""

    acked: list[int] = field(default_factory=list)
    recorded: Counter[tuple[str, str]] = field(default_factory=Counter)
    writes: list[float] = field(default_factory=list)  # seconds per database write
    duplicates: int = 0
    dropped: int = 0  # lost to a bug (the spool counts what the journal could not take)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (level, text) to log
    notable: list[Row] = field(default_factory=list)

    def payload(self, degraded: bool, counts: Counters) -> dict[str, Any]:
        """The frame; ``counts``: what the spool did in this round."""
        notable = [{**row, "occurred_at": row["occurred_at"].timestamp()} for row in self.notable]
        return {
            "acked": self.acked,
            "recorded": [[kind, verdict, n] for (kind, verdict), n in self.recorded.items()],
            "writes": self.writes,
            "journaled": counts.journaled,
            "replayed": counts.replayed,
            "duplicates": self.duplicates,
            "dropped": counts.lost + self.dropped,
            "rejected": counts.set_aside,
            "write_errors": counts.failures,
            "problems": self.problems,
            "degraded": degraded,
            "notable": notable,
        }

    def __bool__(self) -> bool:
        return bool(self.acked or self.writes or self.problems)


class EventStore(Store[KeyedEvent]):
    """The receiver's events as shared/spool.py writes them: BatchStore's transaction,
    the journal's JSON objects, and what happened told in the :class:`Report`."""

    def __init__(self, batches: BatchStore) -> None:
        self.batches = batches
        self.report = Report()
        self._parts: list[Written] = []  # of the batch being committed (one, or one per event)

    def write(self, items: list[KeyedEvent], replay: bool) -> int:
        written = self.batches.write(items, replay)
        self._parts.append(written)
        return written.inserted

    def to_record(self, item: KeyedEvent) -> Record:
        return to_record(item)

    def from_record(self, record: Record) -> KeyedEvent:
        return from_record(record)

    # --- what the writer tells the receiver (shared/spool.py Store hooks) ---

    def committed(self, stored: int, replay: bool, seconds: float) -> None:
        parts, self._parts = self._parts, []
        report = self.report
        report.writes.append(seconds)
        for written in parts:
            report.recorded.update(written.recorded)
            report.notable += written.notable
            if replay:
                report.duplicates += written.duplicates
        if stored:
            opens = sum(n for w in parts for (kind, _), n in w.recorded.items() if kind == "open")
            log.info(
                "recorded %d events (%d opens, %d clicks)%s",
                stored,
                opens,
                stored - opens,
                " from the journal" if replay else "",
            )

    def unavailable(self, error: Exception, items: list[KeyedEvent], first: bool) -> None:
        self._parts.clear()  # nothing of it was committed: it is journaled, replayed later
        if first:
            problem = f"database unavailable, journaling events: {first_line(error)}"
            self.report.problems.append((logging.WARNING, problem))

    def lost(self, items: list[KeyedEvent], error: BaseException | None) -> None:
        problem = f"cannot write the event journal: {len(items)} hits lost ({error})"
        self.report.problems.append((logging.ERROR, problem))

    def refusing(self, count: int, error: Exception) -> None:
        log.error("the database refused a batch; writing it row by row", exc_info=error)

    def set_aside(self, records: list[Record], error: BaseException, unreadable: bool) -> None:
        if unreadable:
            problem = f"journal: {len(records)} unreadable events set aside"
            self.report.problems.append((logging.ERROR, problem))


class WriterLoop:
    """Merge and acknowledge the receiver's batches; the spool writes or journals them."""

    def __init__(self, store: BatchStore, journal: Journal) -> None:
        self.events = EventStore(store)
        self.spool = Spool(
            self.events, journal, replay_slice=REPLAY_SLICE, scan_interval=REPLAY_SCAN_INTERVAL
        )
        self._reported = Counters()

    @property
    def journal(self) -> Journal:
        return self.spool.journal

    @property
    def degraded(self) -> bool:
        return self.spool.degraded

    @property
    def busy(self) -> bool:
        """More journal to replay right away (the caller should not wait for input)."""
        return self.spool.busy

    @property
    def news(self) -> bool:
        """Something to report (a batch acknowledged, a write, a figure changed)."""
        return bool(self.events.report) or self.spool.counts != self._reported

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
        report = self.events.report
        try:
            self.spool.write(events)
        except Exception:  # a bug: count the events lost rather than crash on them again
            log.exception("event writer: %d events failed", len(events))
            report.dropped += len(events)
            report.problems.append((logging.ERROR, f"{len(events)} hits lost (a bug)"))
        report.acked += ids

    def tick(self, stopping: bool = False) -> None:
        """Between batches: probe the database while down, replay a slice of the journal."""
        if not stopping:
            self.spool.tick()

    def take_report(self) -> dict[str, Any]:
        counts = self.spool.counts
        report, self.events.report = self.events.report, Report()
        payload = report.payload(self.spool.degraded, counts.since(self._reported))
        self._reported = replace(counts)
        return payload


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
    loop = WriterLoop(store, Journal(Path(config["journal_dir"]), prefix=JOURNAL_PREFIX))
    reports.send({"ready": os.getpid()})
    interval = float(config["flush_interval"])
    told_degraded = False
    try:
        while True:
            loop.batches([message[1:] for message in pending])
            loop.tick(stopping=inbox.closed)
            if loop.news or loop.degraded != told_degraded:
                told_degraded = loop.degraded
                reports.send(loop.take_report())
            if inbox.closed:
                return 0
            pending = inbox.read(0 if loop.busy else interval)
    finally:
        loop.spool.close()
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())

"""Record hits without ever making a request wait on the database.

The road of one hit::

    request -> new_event() (receiver/eventrecord.py): a tuple -> EventWriter.submit(): a list append
        ... every event_flush_interval s, or at event_batch_size pending ...
    EventWriter: numbers the batch (a key prefix and a first number) and hands it
        to its writer process through a pipe, never blocking; keeps it until the
        writer acknowledges it
    writer process (receiver/eventstore.py, frames: receiver/frames.py): gives each
        event its unique key, classifies it (receiver/classify.py), INSERT ... ON
        CONFLICT DO NOTHING with the outbox rows in one transaction
        (receiver/eventrows.py) — or journals the batch while the database is
        down, and replays the journal afterwards (shared/spool.py); reports back
    EventWriter: the figures into /metrics, the rows that notify someone to the
        on_written listeners (dashboard live feed)

The request does nothing that does not change its response: it verifies the
token and appends a tuple. Everything else happens in the writer process, beside
the requests rather than between them (its module docstring says why not a thread).

Every event's key is fixed before its first write attempt (the receiver numbers
the batch), so a batch written twice — sent again to a new writer after a crash,
replayed from the journal after an ambiguous commit or a crash between commit and
delete — is absorbed by the unique constraint: each hit is stored exactly once.

What a crash can lose: a receiver process killed (SIGKILL) loses the events
still in its memory, at most ``event_flush_interval`` seconds of hits
(``TRACKRELAY_EVENT_FLUSH_INTERVAL``, default 0.1 s); its writer process goes
on and writes or journals everything it was handed, then exits. A writer
process that dies is started again and gets every batch it had not acknowledged.
Both dying at once (power loss) also loses what the writer had received but
not yet committed or journaled. Nothing already in the journal is lost.

The journal: JSON lines under ``<var_dir>/journal/``, fsynced, mode 0600, per
process (``events-<pid>-<n>-<random>.jsonl``, shared/journal.py) and held with
``flock`` while written, so with several workers each writer replays its own
files and those of dead processes, never a live sibling's. If the journal
cannot be written either (disk full), pixels and redirects are still served:
the batch is dropped, logged at ERROR and counted in
``trackrelay_events_dropped_total``. The journal keeps the full client IP until
replay, because the "sender" rule compares it with the IP that submitted the
message; the database gets the truncated IP (/24, /48) unless
``TRACKRELAY_STORE_FULL_IP`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from receiver.eventrecord import JOURNAL_PREFIX, RawEvent, Row, event_keys, keyed, to_record
from receiver.frames import FRAME_HEADER, frame
from receiver.metrics import Metrics
from shared.config import Settings
from shared.journal import Journal

log = logging.getLogger(__name__)

#: Events held in memory at most (waiting, or sent and not acknowledged); beyond,
#: hits are dropped (and counted).
MAX_PENDING = 200_000
#: /healthz reports ``dropping`` (and 503) this many seconds after the last hit lost.
DROPPING_FOR = 60.0
#: Seconds before a writer process that died is started again.
RESTART_DELAY = 1.0
#: Seconds ``stop()`` waits for the writer process to finish; then this process journals.
STOP_TIMEOUT = 60.0

OnWritten = Callable[[list[Row]], Awaitable[None]]

_Batch = tuple[str, int, list[RawEvent]]  # key prefix, first number, events
#: The directory holding this very code: the writer process imports it, wherever run from.
_CODE_ROOT = str(Path(__file__).resolve().parents[1])


class EventWriter:
    """The in-memory queue and the writer process that stores it (module docstring)."""

    def __init__(
        self, settings: Settings, metrics: Metrics, on_written: OnWritten | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        #: The journal directory: its size for /healthz; journaled into here at
        #: ``stop()`` only if the writer process could not take the last batches.
        self.journal = Journal(settings.var_dir / "journal", prefix=JOURNAL_PREFIX)
        self.listeners: list[OnWritten] = [on_written] if on_written else []
        self._pending: list[RawEvent] = []
        self._batch_size = settings.event_batch_size
        self._unacked: dict[int, _Batch] = {}  # by batch id, in sending order
        self._unacked_events = 0
        self._batch_ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._database_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: asyncio.WriteTransport | None = None
        self._reader: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._writer_degraded = False  # as the writer last reported
        self._writer_down = False  # the writer process died; a new one is starting
        self._stopping = False
        self._notifications: set[asyncio.Future[None]] = set()
        self._last_drop_log = 0.0
        self._last_drop = -DROPPING_FOR  # monotonic time of the last hit lost

    # --- the request side ---

    def submit(self, event: RawEvent) -> None:
        """Queue one event (see :func:`new_event`). O(1); never touches the database or the disk."""
        pending = self._pending
        if len(pending) + self._unacked_events >= MAX_PENDING:
            self.metrics.dropped += 1
            now = self._last_drop = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.error("event queue full (%d): dropping hits", MAX_PENDING)
            return
        pending.append(event)
        if len(pending) >= self._batch_size:
            self._wake.set()

    @property
    def depth(self) -> int:
        """Events not yet committed or journaled."""
        return len(self._pending) + self._unacked_events

    @property
    def degraded(self) -> bool:
        """Events are not reaching the database (journaled, or the writer is restarting)."""
        return self._writer_degraded or self._writer_down

    @property
    def dropping(self) -> bool:
        """Hits were lost within the last DROPPING_FOR seconds (queue or journal disk full)."""
        return time.monotonic() - self._last_drop < DROPPING_FOR

    @property
    def state(self) -> str:
        """``ok``, ``journaling`` (database unavailable) or ``restarting`` (writer process)."""
        if self._writer_down:
            return "restarting"
        return "journaling" if self._writer_degraded else "ok"

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id (diagnostics, tests); None before start."""
        return self._process.pid if self._process is not None else None

    def subscribe(self, listener: OnWritten) -> None:
        """Call ``listener(rows)`` after each committed batch.

        ``rows`` are the inserted rows that may notify someone (shared/notable.py
        ``may_notify``: human and proxy hits, machine opens, unknown clicks) as
        dictionaries of the events table's columns and ``notable``, what the
        writer decided about each (shared/notable.py); scanner and self hits are
        only counted. A batch without such rows calls no listener.
        """
        self.listeners.append(listener)

    # --- lifecycle ---

    async def start(self, engine: Engine) -> None:
        """Start the writer process for ``engine``'s database, and the flushing task."""
        self._database_url = engine.url.render_as_string(hide_password=False)
        await self._spawn()
        self._flusher = asyncio.create_task(self._flush_loop(), name="trackrelay-event-flush")

    async def stop(self) -> None:
        """Hand over everything still queued, let the writer finish, then stop it."""
        self._stopping = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
        self._flush()
        if self._pipe is not None:
            self._pipe.close()  # the writer finishes what it read, reports, exits
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), STOP_TIMEOUT)
            except TimeoutError:
                log.error("the event writer did not finish in %.0f s; stopping it", STOP_TIMEOUT)
                if self._process is not None:
                    self._process.kill()
                await self._reader
        if self._unacked:
            await asyncio.to_thread(self._journal_unacked)
        if self._notifications:
            await asyncio.gather(*self._notifications, return_exceptions=True)
        self.journal.close()

    async def _spawn(self) -> None:
        """Start a writer process and send it every batch not yet acknowledged."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH")) if p)
        process = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "receiver.eventstore"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        reports, _ = await loop.connect_read_pipe(lambda: protocol, process.stdout)
        pipe, _ = await loop.connect_write_pipe(asyncio.Protocol, process.stdin)
        self._process, self._pipe = process, pipe
        config = {
            "database_url": self._database_url,
            "journal_dir": str(self.journal.directory),
            "store_full_ip": self.settings.store_full_ip,
            "notify_email": bool(self.settings.notify_from),
            "flush_interval": self.settings.event_flush_interval,
            "log_level": self.settings.log_level,
        }
        pipe.write(frame(config))
        for batch_id, (prefix, first, events) in self._unacked.items():
            pipe.write(frame(("batch", batch_id, prefix, first, events)))
        self._reader = asyncio.create_task(
            self._read(process, reader, reports), name="trackrelay-event-reports"
        )

    async def _read(
        self,
        process: subprocess.Popen[bytes],
        reader: asyncio.StreamReader,
        transport: asyncio.BaseTransport,
    ) -> None:
        """Apply the writer's reports until it exits; start a new one if it died."""
        try:
            while True:
                (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                self._apply(marshal.loads(await reader.readexactly(size)))  # noqa: S302 - ours
        except asyncio.IncompleteReadError:
            pass  # the writer closed its end: it is exiting
        except Exception:
            log.exception("bad report from the event writer")
            process.kill()
        transport.close()
        if self._pipe is not None:
            self._pipe.close()
        code = await asyncio.to_thread(process.wait)
        for end in (process.stdin, process.stdout):
            with contextlib.suppress(OSError):
                end.close()  # type: ignore[union-attr]
        if self._stopping:
            return
        log.error(
            "the event writer process exited (status %s) with %d events unacknowledged; "
            "starting a new one",
            code,
            self._unacked_events,
        )
        self._writer_down = True
        self._restart = asyncio.create_task(self._respawn())

    async def _respawn(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self._spawn()
                return
            except Exception:
                log.exception("cannot start the event writer process; retrying")

    def _apply(self, report: dict[str, Any]) -> None:
        if "ready" in report:
            self._writer_down = False
            return
        for batch_id in report["acked"]:
            _, _, events = self._unacked.pop(batch_id)
            self._unacked_events -= len(events)
        metrics = self.metrics
        for kind, verdict, count in report["recorded"]:
            metrics.recorded[kind, verdict] += count
        for seconds in report["writes"]:
            metrics.observe_write(seconds)
        metrics.journaled += report["journaled"]
        metrics.replayed += report["replayed"]
        metrics.duplicates += report["duplicates"]
        metrics.dropped += report["dropped"]
        if report["dropped"]:
            self._last_drop = time.monotonic()
        metrics.rejected += report["rejected"]
        metrics.write_errors += report["write_errors"]
        for level, problem in report["problems"]:
            log.log(level, "%s", problem)
        if self._writer_degraded and not report["degraded"]:
            log.info("database available again: writing events")
        self._writer_degraded = report["degraded"]
        if report["notable"]:
            rows = report["notable"]
            for row in rows:
                row["occurred_at"] = datetime.fromtimestamp(row["occurred_at"], UTC)
            self._notify(rows)

    async def _flush_loop(self) -> None:
        interval = self.settings.event_flush_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            self._flush()

    def _flush(self) -> None:
        """Number what is queued and hand it to the writer, ``event_batch_size`` at a time."""
        batch, self._pending = self._pending, []
        size = self._batch_size
        for start in range(0, len(batch), size):
            events = batch[start : start + size]
            batch_id = next(self._batch_ids)
            prefix, first = event_keys.reserve(len(events))
            self._unacked[batch_id] = (prefix, first, events)
            self._unacked_events += len(events)
            if self._pipe is not None and not self._pipe.is_closing():
                self._pipe.write(frame(("batch", batch_id, prefix, first, events)))

    def _journal_unacked(self) -> None:
        """The last resort at stop: what the writer never acknowledged goes to the journal."""
        records = [
            to_record(event)
            for prefix, first, events in self._unacked.values()
            for event in keyed(prefix, first, events)
        ]
        written, error = self.journal.append_what_fits(records)
        self.metrics.journaled += written
        if written < len(records):
            self.metrics.dropped += len(records) - written
            self._last_drop = time.monotonic()
            log.error(
                "cannot write the event journal: %d hits lost (%s)", len(records) - written, error
            )
        else:
            log.warning("journaled %d events the event writer did not take", written)
        self._unacked.clear()
        self._unacked_events = 0

    def _notify(self, rows: list[Row]) -> None:
        for listener in self.listeners:
            task: asyncio.Future[None] = asyncio.ensure_future(listener(rows))
            self._notifications.add(task)
            task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Future[None]) -> None:
        self._notifications.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an on_written listener failed", exc_info=task.exception())

"""Group commit on asyncio: ``await put(item)`` returns once the item is committed
or journaled, and ONE writer task writes everything queued as one batch.

The relay's message records (relay/record.py) and its answers
(relay/answerstore.py) use it: the client's reply must not run ahead of its
record, and ten clients should share one commit. What a batch write does, and
what happens when the database is down, is the synchronous core's business
(shared/spool.py ``Spool``); this is only its asyncio face, for any writer
that lives on an event loop. :class:`SpooledWriter` is that whole writer put
together once (a store, its journal, the spool and the group commit), so
start, stop, replay and "database away -> journal, stored once after" are
wired in one place; a writer only brings its :class:`~shared.spool.Store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, Generic, TypeVar

from shared.journal import Journal
from shared.spool import Counters, Item, Spool, Store

log = logging.getLogger(__name__)


class GroupCommit(Generic[Item]):
    """The asyncio face of a :class:`Spool`: ``await put(item)`` returns once it is
    committed or journaled; ONE writer task writes everything queued in one batch.

    Why a task on the event loop that hands each batch to ``asyncio.to_thread``,
    not a thread of its own: the queue and the waiters' futures stay on the loop,
    so they need no locks and no cross-thread wake-up per waiter; the one hop to
    a thread and back per batch is shared by the batch. There is no delay: while
    one batch is written the next accumulates, so one producer gets batches of
    one and ten share commits.
    """

    def __init__(self, spool: Spool[Item], max_batch: int, name: str) -> None:
        self.spool = spool
        self.max_batch = max_batch  # most live items written in one transaction
        self.name = name
        self._pending: list[tuple[Item, asyncio.Future[None]]] = []
        self._lock = asyncio.Lock()  # the spool, one call at a time
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the writer (it first replays what a previous run left)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Write (or journal) every queued item, then close the journal."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        async with self._lock:
            while self._pending:
                await self._write_pending()
            await asyncio.to_thread(self.spool.close)

    async def put(self, item: Item) -> None:
        """Queue ``item`` and return once it is committed or journaled; never raises
        for the database's sake."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._task is None or self._task.done():  # no writer (not started, or stopped)
            async with self._lock:
                while self._pending:
                    await self._write_pending()
        else:
            self._wake.set()
        await done

    async def _run(self) -> None:
        spool = self.spool
        while True:
            if not self._pending and not self._stopping:
                wait = spool.due_in()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake.clear()
            if self._stopping and not self._pending:
                return
            try:
                async with self._lock:
                    if self._pending:
                        await self._write_pending()
                    # Due even under steady traffic: it is also the probe while degraded.
                    if not self._stopping and spool.due_in() == 0:
                        await asyncio.to_thread(spool.tick)
            except Exception:  # never let the writer die: the next round retries
                log.exception("%s failed", self.name)

    async def _write_pending(self) -> None:
        """One batch: everything queued (up to ``max_batch``); then wake its waiters."""
        batch = self._pending[: self.max_batch]
        self._pending = self._pending[self.max_batch :]
        try:
            await asyncio.to_thread(self.spool.write, [item for item, _ in batch])
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)


S = TypeVar("S", bound=Store[Any])


class SpooledWriter(Generic[Item, S]):
    """A :class:`~shared.spool.Store` behind its journal
    (``<directory>/<prefix>-<pid>-....jsonl``), a :class:`Spool` and a
    :class:`GroupCommit`: ``await put(item)`` returns once it is committed or
    journaled; :meth:`start` first replays what a previous run left;
    :meth:`stop` writes (or journals) what is queued, then closes the store."""

    def __init__(
        self,
        store: S,
        directory: Path,
        prefix: str,
        *,
        max_batch: int,
        replay_slice: int,
        scan_interval: float,
        name: str,
    ) -> None:
        self._store = store
        self.spool: Spool[Item] = Spool(
            store,
            Journal(directory, prefix=prefix),
            replay_slice=replay_slice,
            scan_interval=scan_interval,
        )
        self.writer: GroupCommit[Item] = GroupCommit(self.spool, max_batch, name=name)

    @property
    def store(self) -> S:
        return self._store

    @store.setter
    def store(self, store: S) -> None:  # a test wraps the real store
        self._store = self.spool.store = store

    @property
    def degraded(self) -> bool:
        """The database is away: live batches go to the journal until a probe works."""
        return self.spool.degraded

    @property
    def counts(self) -> Counters:
        """Batches and items written, replayed, journaled, lost (shared/spool.py)."""
        return self.spool.counts

    async def start(self) -> None:
        """Start the writer (it first replays what a previous run left)."""
        await self.writer.start()

    async def stop(self) -> None:
        """Write (or journal) every queued item, then close the journal and the store."""
        await self.writer.stop()
        self.store.close()

    async def put(self, item: Item) -> None:
        """Return once ``item`` is committed or journaled; never raises for the database."""
        await self.writer.put(item)

"""The durability core (shared/spool.py) and its asyncio face (shared/groupcommit.py).

The core's decisions are tested directly, with a store that fails or refuses
on command and a real journal in a temporary directory; the receiver's store
configured on it is then run against real SQLite and PostgreSQL. The relay's
store through the spool is covered end to end in test_relay_record.py and
test_relay_journal.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from receiver.eventrecord import JOURNAL_PREFIX, event_keys, new_event, to_record
from receiver.eventrows import BatchStore
from receiver.eventstore import WriterLoop
from shared.groupcommit import GroupCommit
from shared.journal import Journal, Record
from shared.spool import Counters, Invalid, Spool, Store
from tests.support.receiverkit import count_events

HOUR = 3600.0


class FakeStore(Store[int]):
    """Items are ints; ``down``: the database is unavailable; ``bad``: refused as invalid."""

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self.down = False
        self.bad: set[int] = set()
        self.writes: list[tuple[list[int], bool]] = []
        self.said: list[tuple[Any, ...]] = []  # the hooks, in order

    def write(self, items: list[int], replay: bool) -> int:
        self.writes.append((list(items), replay))
        if self.down:
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        if self.bad.intersection(items):
            raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
        new = {item for item in items if item not in self.rows}
        self.rows |= new
        return len(new)

    def to_record(self, item: int) -> Record:
        return {"n": item}

    def from_record(self, record: Record) -> int:
        return int(record["n"])

    def committed(self, stored: int, replay: bool, seconds: float) -> None:
        self.said.append(("committed", stored, replay))

    def unavailable(self, error: Exception, items: list[int], first: bool) -> None:
        self.said.append(("unavailable", items, first))

    def journaled(self, items: list[int]) -> None:
        self.said.append(("journaled", items))

    def lost(self, items: list[int], error: BaseException | None) -> None:
        self.said.append(("lost", items))

    def refusing(self, count: int, error: Exception) -> None:
        self.said.append(("refusing", count))

    def set_aside(self, records: list[Record], error: BaseException, unreadable: bool) -> None:
        self.said.append(("set_aside", records, unreadable))

    def replayed_all(self, stored: int) -> None:
        self.said.append(("replayed_all", stored))


_open: list[Journal] = []


@pytest.fixture(autouse=True)
def _close_journals() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def spool(tmp_path: Path, store: FakeStore, probe: float = 0.0, scan: float = HOUR) -> Spool[int]:
    journal = Journal(tmp_path / "journal", prefix="t")
    _open.append(journal)
    return Spool(store, journal, replay_slice=3, scan_interval=scan, probe_interval=probe)


def left_behind(tmp_path: Path, records: list[Record]) -> None:
    """A journal file that a dead process left."""
    journal = Journal(tmp_path / "journal", prefix="t")
    journal.append(records)
    journal.close()


def journal_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "journal").glob("t-*.jsonl"))


def rejected(tmp_path: Path) -> list[Record]:
    path = tmp_path / "journal" / "rejected-t.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_live_batch_is_one_transaction(tmp_path: Path) -> None:
    store = FakeStore()
    s = spool(tmp_path, store)
    s.write([1, 2, 3])
    s.write([])  # nothing to do: no transaction
    assert store.writes == [([1, 2, 3], False)]
    assert store.said == [("committed", 3, False)]
    assert (s.counts.batches, s.counts.written, s.degraded) == (1, 3, False)


def test_an_unavailable_database_degrades_once_and_batches_go_to_the_journal(
    tmp_path: Path,
) -> None:
    store = FakeStore()
    store.down = True
    s = spool(tmp_path, store, probe=HOUR)
    s.write([1, 2])
    s.write([3])  # degraded: straight to the journal, the database is not asked
    assert store.writes == [([1, 2], False)]
    assert store.said == [("unavailable", [1, 2], True), ("journaled", [1, 2]), ("journaled", [3])]
    assert s.degraded
    assert (s.counts.failures, s.counts.journaled) == (1, 3)
    s.tick()  # the probe is not due
    assert len(store.writes) == 1


def test_the_probe_replays_the_journal_and_ends_the_outage(tmp_path: Path) -> None:
    store = FakeStore()
    store.down = True
    s = spool(tmp_path, store)
    s.write([1, 2, 3, 4])
    s.tick()  # a probe that fails: still degraded, told once
    assert s.degraded
    assert s.counts.failures == 2
    assert [said for said in store.said if said[0] == "unavailable"] == [
        ("unavailable", [1, 2, 3, 4], True),
        ("unavailable", [], False),
    ]
    store.down = False
    s.tick()  # the probe: the first slice of our own (sealed) file
    assert not s.degraded
    assert store.rows == {1, 2, 3}
    assert s.busy  # more to replay right away
    assert s.due_in() == 0
    s.tick()
    s.tick()  # the journal is empty: the round ends
    assert store.rows == {1, 2, 3, 4}
    assert not s.busy
    assert store.writes[-2:] == [([1, 2, 3], True), ([4], True)]
    assert store.said[-1] == ("replayed_all", 4)
    assert (s.counts.replayed, s.counts.journaled) == (4, 4)
    assert journal_files(tmp_path) == []
    s.close()


def test_a_replayed_record_already_stored_is_not_counted_twice(tmp_path: Path) -> None:
    store = FakeStore()
    store.rows = {1}  # committed before a crash that left the journal file behind
    left_behind(tmp_path, [{"n": 1}, {"n": 2}])
    s = spool(tmp_path, store)  # a new spool first replays what a previous run left
    s.tick()
    s.tick()
    assert store.rows == {1, 2}
    assert s.counts.replayed == 1
    assert store.said[-1] == ("replayed_all", 1)


def test_a_refused_batch_is_written_item_by_item_and_only_the_bad_one_set_aside(
    tmp_path: Path,
) -> None:
    store = FakeStore()
    store.bad = {2}
    s = spool(tmp_path, store)
    s.write([1, 2, 3])
    assert store.rows == {1, 3}
    assert store.writes == [([1, 2, 3], False), ([1], False), ([2], False), ([3], False)]
    assert store.said == [
        ("refusing", 3),
        ("set_aside", [{"n": 2}], False),
        ("committed", 2, False),
    ]
    assert rejected(tmp_path) == [{"n": 2}]
    assert (s.counts.set_aside, s.counts.written, s.degraded) == (1, 2, False)


def test_a_single_refused_item_is_set_aside_without_a_second_try(tmp_path: Path) -> None:
    store = FakeStore()
    store.bad = {7}
    s = spool(tmp_path, store)
    s.write([7])
    assert store.writes == [([7], False)]
    assert rejected(tmp_path) == [{"n": 7}]


def test_invalid_from_the_store_counts_as_refused(tmp_path: Path) -> None:
    class Unreadable(FakeStore):
        def write(self, items: list[int], replay: bool) -> int:
            if 0 in items:
                raise Invalid("an item without a message id")
            return super().write(items, replay)

    store = Unreadable()
    s = spool(tmp_path, store)
    s.write([0, 5])
    assert store.rows == {5}
    assert rejected(tmp_path) == [{"n": 0}]


def test_an_unreadable_journal_line_is_set_aside_and_the_rest_replayed(tmp_path: Path) -> None:
    store = FakeStore()
    left_behind(tmp_path, [{"n": 1}, {"nope": 1}, {"n": 2}])
    s = spool(tmp_path, store)
    s.tick()
    assert store.rows == {1, 2}
    assert ("set_aside", [{"nope": 1}], True) in store.said
    assert rejected(tmp_path) == [{"nope": 1}]
    s.tick()
    assert journal_files(tmp_path) == []
    assert s.counts.set_aside == 1


def test_an_unreadable_line_waits_while_the_database_is_down(tmp_path: Path) -> None:
    """Set aside only once the slice is committed: a failed probe reads it again."""
    store = FakeStore()
    store.down = True
    left_behind(tmp_path, [{"n": 1}, {"nope": 1}])
    s = spool(tmp_path, store, probe=HOUR)
    s.tick()
    assert s.degraded
    assert rejected(tmp_path) == []


def test_what_the_journal_cannot_take_is_counted_lost(tmp_path: Path) -> None:
    (tmp_path / "journal").write_text("a file where the directory should be")
    store = FakeStore()
    store.down = True
    s = spool(tmp_path, store, probe=HOUR)
    s.write([1, 2])
    assert (s.counts.journaled, s.counts.lost) == (0, 2)
    assert store.said[-1] == ("lost", [1, 2])


def test_files_of_dead_processes_are_found_at_the_next_scan(tmp_path: Path) -> None:
    store = FakeStore()
    s = spool(tmp_path, store, scan=0.0)
    s.tick()  # the first round: nothing there
    assert not s.busy
    left_behind(tmp_path, [{"n": 9}])
    assert s.due_in() == 0
    s.tick()
    assert store.rows == {9}


def test_nothing_is_due_between_scans(tmp_path: Path) -> None:
    s = spool(tmp_path, FakeStore())
    s.tick()  # the first round ends: the journal is empty
    assert not s.busy
    assert s.due_in() > HOUR - 60


def test_counters_since_an_earlier_copy() -> None:
    before = Counters(journaled=2, lost=1)
    now = Counters(journaled=5, lost=1, replayed=3)
    assert now.since(before) == Counters(journaled=3, replayed=3)


# --- the asyncio face ---


def test_group_commit_returns_after_the_commit_and_shares_it(tmp_path: Path) -> None:
    store = FakeStore()
    writer = GroupCommit(spool(tmp_path, store), max_batch=2, name="test-writer")

    async def scenario() -> None:
        await writer.start()
        await asyncio.gather(*(writer.put(i) for i in range(5)))
        assert store.rows == set(range(5))
        await writer.stop()

    asyncio.run(scenario())
    live = [items for items, replay in store.writes if not replay]
    assert sorted(i for items in live for i in items) == list(range(5))
    assert len(live) < 5
    assert max(map(len, live)) == 2


def test_group_commit_journals_while_down_and_stop_writes_what_is_queued(tmp_path: Path) -> None:
    store = FakeStore()
    store.down = True
    s = spool(tmp_path, store, probe=HOUR)
    writer = GroupCommit(s, max_batch=10, name="test-writer")

    async def scenario() -> None:
        await writer.put(1)  # no writer task: written (journaled) at once
        await writer.start()
        tasks = [asyncio.create_task(writer.put(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        await writer.stop()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert s.counts.journaled == 3
    assert store.rows == set()


# --- the receiver's store on the spool, real databases ---


def test_the_receivers_writer_replays_a_dead_writers_journal_once(
    engine: Engine, tmp_path: Path
) -> None:
    good = event_keys.assign(
        [new_event("open", 3, i, 0, "192.0.2.1", "curl/8", "GET") for i in range(4)]
    )
    loop = WriterLoop(
        BatchStore(engine, store_full_ip=False), Journal(tmp_path, prefix=JOURNAL_PREFIX)
    )
    raw = [event[1:] for event in good[:2]]
    loop.batches([(1, good[0][0][:16], int(good[0][0][16:], 16), raw)])  # the live batch
    dead = Journal(tmp_path, prefix=JOURNAL_PREFIX)
    dead.append([*(to_record(event) for event in good), {"event_key": "no-kind"}])
    dead.close()
    loop.tick()
    loop.tick()
    report = loop.take_report()
    assert report["acked"] == [1]
    assert (report["replayed"], report["duplicates"], report["rejected"]) == (2, 2, 1)
    assert count_events(engine) == 4
    assert not list(tmp_path.glob(f"{JOURNAL_PREFIX}-*.jsonl"))
    assert "no-kind" in (tmp_path / f"rejected-{JOURNAL_PREFIX}.jsonl").read_text()
    assert not loop.news  # everything was reported
    loop.spool.close()

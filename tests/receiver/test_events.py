"""The event pipeline: journaling while the database is down, replay, restarts, no duplicates.

"Down" is real: for PostgreSQL the receiver reaches the database through a TCP
proxy that the test stops (connections refused, open ones reset); for SQLite
another connection holds the write lock (``BEGIN EXCLUSIVE``), as a long
migration or a backup would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, insert

from receiver.app import create_app
from receiver.classify import Hit, classify
from receiver.eventrecord import JOURNAL_PREFIX, event_keys, new_event, to_record, truncate_ip
from receiver.eventrows import EVENTS, BatchStore, SqliteTime
from receiver.eventstore import WriterLoop
from shared.config import Settings
from shared.journal import Journal
from shared.models import Message
from shared.tokens import Signer
from tests.support.receiverkit import (
    Outage,
    ServerThread,
    count_events,
    event_rows,
    start_receiver,
    wait_for,
)


def _health(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/healthz").json())


def _journal_holds_everything(client: httpx.Client) -> bool:
    health = _health(client)
    return health["queue_depth"] == 0 and health["journal_bytes"] > 0


def _distinct_keys(engine: Engine) -> int:
    return len({row["event_key"] for row in event_rows(engine)})


def test_every_hit_during_an_outage_is_recorded_after_it(
    make_settings: Callable[..., Settings], engine: Engine, outage: Outage
) -> None:
    settings = make_settings(database_url=outage.app_url, event_flush_interval=0.05)
    signer = Signer(settings.signing_keys())
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        for i in range(20):
            client.get(f"/o/{signer.open_token(1, i)}")
        wait_for(lambda: count_events(engine) == 20)

        outage.down()
        for i in range(300):
            client.get(f"/o/{signer.open_token(2, i)}.gif")
            client.get(f"/c/{signer.click_token(2, i, 1, 'https://example.com/')}")
        wait_for(lambda: _journal_holds_everything(client))
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["event_writer"] == "journaling"
        assert count_events(engine) == 20

        outage.up()
        wait_for(lambda: count_events(engine) == 620, timeout=30)
        wait_for(lambda: _health(client)["journal_files"] == 0)
        assert client.get("/healthz").status_code == 200
        metrics = client.get("/metrics").text
    assert _distinct_keys(engine) == 620
    assert count_events(engine, "kind = 'click' AND message_id = 2") == 300
    assert "trackrelay_events_dropped_total 0" in metrics
    journaled = re.search(r"^trackrelay_events_journaled_total (\d+)$", metrics, re.M)
    assert journaled is not None
    assert int(journaled[1]) > 0


def test_a_killed_receiver_replays_its_journal_once(
    make_settings: Callable[..., Settings],
    engine: Engine,
    outage: Outage,
    tmp_path: Path,
) -> None:
    var = tmp_path / "receiver-var"
    settings = make_settings(var_dir=var, database_url=outage.app_url)
    env = {
        "TRACKRELAY_VAR_DIR": str(var),
        "TRACKRELAY_DATABASE_URL": outage.app_url,
        "TRACKRELAY_SECRET_KEY": settings.secret_key.get_secret_value(),
        "TRACKRELAY_HTTP_PORT": "0",
        "TRACKRELAY_EVENT_FLUSH_INTERVAL": "0.05",
    }
    signer = Signer(settings.signing_keys())
    log = tmp_path / "receiver.log"

    proc, url = start_receiver(env, log)
    try:
        outage.down()
        with httpx.Client(base_url=url) as client:
            for i in range(200):
                assert client.get(f"/o/{signer.open_token(5, i)}").status_code == 200
            wait_for(lambda: _journal_holds_everything(client))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    journal = sorted((var / "journal").glob("events-*.jsonl"))
    assert journal, "nothing was journaled"
    saved = tmp_path / "saved-journal"
    saved.mkdir()
    for path in journal:
        shutil.copy2(path, saved / path.name)

    outage.up()
    proc, url = start_receiver(env, log)
    try:
        wait_for(lambda: count_events(engine) == 200, timeout=30)
        with httpx.Client(base_url=url) as client:
            wait_for(lambda: _health(client)["journal_files"] == 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0

    # A crash between the last commit and deleting the file: the same rows come back.
    for path in saved.iterdir():
        shutil.copy2(path, var / "journal" / path.name)
    proc, url = start_receiver(env, log)
    try:
        with httpx.Client(base_url=url) as client:
            wait_for(lambda: _health(client)["journal_files"] == 0)
            metrics = client.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert count_events(engine) == 200
    assert _distinct_keys(engine) == 200
    assert "trackrelay_events_duplicates_total 200" in metrics


def test_journal_skips_a_torn_last_line(tmp_path: Path) -> None:
    journal = Journal(tmp_path, prefix=JOURNAL_PREFIX)
    journal.append([{"event_key": "a"}, {"event_key": "b"}])
    journal.seal()
    [path] = tmp_path.glob("events-*.jsonl")
    with open(path, "a") as f:
        f.write('{"event_key": "c", "kind"')  # the process died mid-write
    assert [e["event_key"] for e in journal.read_slice(10)] == ["a", "b"]
    journal.commit_slice()
    assert journal.read_slice(10) == []
    assert journal.skipped == 1
    assert not path.exists()


def test_a_live_writers_journal_is_not_replayed_by_another(tmp_path: Path) -> None:
    live = Journal(tmp_path, prefix=JOURNAL_PREFIX)
    live.append([{"event_key": "x"}])  # open and locked, as in a running worker
    other = Journal(tmp_path, prefix=JOURNAL_PREFIX)
    assert other.read_slice(10) == []
    live.seal()
    assert [e["event_key"] for e in other.read_slice(10)] == ["x"]
    other.close()


def test_ip_truncation() -> None:
    assert truncate_ip("203.0.113.77") == "203.0.113.0/24"
    assert truncate_ip("2001:db8:aaaa:bbbb::1") == "2001:db8:aaaa::/48"
    assert truncate_ip("::ffff:203.0.113.77") == "203.0.113.0/24"
    assert truncate_ip("203.0.113.77", full=True) == "203.0.113.77"
    assert truncate_ip("testclient") == ""


CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"


def _occurred_as_sqlalchemy_stores_it(timestamp: float) -> str:
    engine = create_engine("sqlite://")
    column_type = EVENTS.c.occurred_at.type.dialect_impl(engine.dialect)
    bind = column_type.bind_processor(engine.dialect)
    assert bind is not None
    return str(bind(datetime.fromtimestamp(timestamp, UTC)))


@given(st.floats(0, 4_102_444_800, allow_nan=False))  # 1970..2100
def test_sqlite_time_is_what_sqlalchemy_stores(timestamp: float) -> None:
    assert SqliteTime()(timestamp) == _occurred_as_sqlalchemy_stores_it(timestamp)


def test_sqlite_time_rounds_half_even_and_carries_into_the_next_second() -> None:
    fast = SqliteTime()
    for timestamp in (1.0000005, 1.0000015, 59.9999996, 1767225599.9999997, 1767225600.0):
        assert fast(timestamp) == _occurred_as_sqlalchemy_stores_it(timestamp)


def _add_message(engine: Engine, message_id: int, client_ip: str, age: timedelta) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(Message.__table__),  # type: ignore[attr-defined]
            {
                "id": message_id,
                "created_at": datetime.now(UTC) - age,
                "sender": "alice@example.org",
                "client_ip": client_ip,
            },
        )


def test_a_batch_is_classified_hit_by_hit_as_classify_does(engine: Engine) -> None:
    """Remembered verdicts never leak between hits that differ in any fact."""
    _add_message(engine, 1, "198.51.100.7", timedelta(hours=1))  # sent from the hit's IP
    _add_message(engine, 2, "192.0.2.1", timedelta(hours=1))
    _add_message(engine, 3, "192.0.2.1", timedelta(seconds=2))  # clicked right away
    hits = [
        new_event("open", 1, 1, 0, "198.51.100.7", CHROME, "GET"),  # self
        new_event("open", 2, 1, 0, "198.51.100.7", CHROME, "GET"),  # human: same UA and IP
        new_event("open", 2, 1, 0, "198.51.100.7", CHROME, "HEAD"),
        new_event("open", 2, 1, 0, "198.51.100.7", CHROME, "GET", "prefetch"),
        new_event("open", 2, 1, 0, "198.51.100.7", CHROME, "GET", "", True),
        new_event("open", 2, 1, 0, "17.58.0.9", "Mozilla/5.0", "GET"),
        new_event("click", 2, 1, 1, "198.51.100.7", CHROME, "GET"),
        new_event("click", 3, 1, 1, "198.51.100.7", CHROME, "GET"),
        new_event("click", 9, 1, 1, "198.51.100.7", CHROME, "GET"),  # message unknown
        new_event("open", 2, 1, 0, "198.51.100.7", CHROME, "GET"),  # again, remembered
        new_event("open", 2, 1, 0, "198.51.100.7", "curl/8.5.0", "GET"),
    ]
    keyed = event_keys.assign(hits)
    written = BatchStore(engine, store_full_ip=False).write(keyed)
    assert written.inserted == len(hits)
    rows = {row["event_key"]: row for row in event_rows(engine)}
    sent = {1: ("198.51.100.7", 3600.0), 2: ("192.0.2.1", 3600.0), 3: ("192.0.2.1", 2.0)}
    for key, _, kind, message_id, _, _, ip, agent, method, purpose, dashboard in keyed:
        sender_ip, age = sent.get(message_id, ("", 0.0))
        expected = classify(
            Hit(
                kind=kind,
                method=method,
                user_agent=agent,
                ip=ip,
                purpose=purpose,
                dashboard_user=dashboard,
                seconds_after_send=age if kind == "click" and sender_ip else None,
                sender_ip=sender_ip,
            )
        )
        row = rows[key]
        assert (row["verdict"], row["reasons"]) == (expected.verdict, expected.reason_text), key
        assert row["ip"] == truncate_ip(ip)
    verdicts = [rows[event[0]]["verdict"] for event in keyed]
    assert verdicts == [
        "self",
        "human",
        "scanner",
        "scanner",
        "self",
        "machine",
        "human",
        "scanner",
        "human",
        "human",
        "scanner",
    ]
    assert written.recorded["open", "human"] == 2
    # Only hits that can notify someone become dictionaries (and reach listeners).
    assert sorted(str(row["verdict"]) for row in written.notable) == ["human"] * 4 + ["machine"]


@pytest.mark.parametrize("size", [1, 7, 500, 1337])
def test_a_batch_of_any_size_is_stored_once(engine: Engine, size: int) -> None:
    store = BatchStore(engine, store_full_ip=True)
    keyed = event_keys.assign(
        [new_event("open", 5, i, 0, "::1", "curl/8", "GET") for i in range(size)]
    )
    assert store.write(keyed).inserted == size
    stored = {row["event_key"]: row for row in event_rows(engine)}
    assert sorted(stored) == sorted(event[0] for event in keyed)
    assert sorted(row["recipient_position"] for row in stored.values()) == list(range(size))
    assert {row["ip"] for row in stored.values()} == {"::1"}


def test_a_live_batch_with_a_stored_key_keeps_only_the_new_rows(engine: Engine) -> None:
    store = BatchStore(engine, store_full_ip=False)
    first = event_keys.assign(
        [new_event("open", 6, i, 0, "192.0.2.1", CHROME, "GET") for i in range(3)]
    )
    store.write(first)
    second = [
        first[1],
        *event_keys.assign([new_event("open", 6, 9, 0, "192.0.2.1", CHROME, "GET")]),
    ]
    written = store.write(second)  # a live batch: the insert finds a key already there
    assert (written.inserted, written.duplicates) == (1, 1)
    assert [row["event_key"] for row in written.notable] == [second[1][0]]
    assert count_events(engine) == 4
    assert _distinct_keys(engine) == 4


def test_an_unreadable_journal_record_is_set_aside_not_replayed_forever(
    make_settings: Callable[..., Settings], engine: Engine, database_url: str
) -> None:
    settings = make_settings(database_url=database_url, event_flush_interval=0.02)
    journal = Journal(settings.var_dir / "journal", prefix=JOURNAL_PREFIX)
    good = event_keys.assign([new_event("open", 7, 1, 0, "192.0.2.1", CHROME, "GET")])
    journal.append([to_record(good[0]), {"event_key": "no-kind"}])
    journal.seal()
    app = create_app(settings, engine)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        wait_for(lambda: _health(client)["journal_files"] == 0)
        metrics = client.get("/metrics").text
    assert [row["event_key"] for row in event_rows(engine)] == [good[0][0]]
    assert "trackrelay_events_rejected_total 1" in metrics
    rejected = (settings.var_dir / "journal" / "rejected-events.jsonl").read_text()
    assert "no-kind" in rejected


def _hits(client: httpx.Client, signer: Signer, message_id: int, count: int) -> None:
    for i in range(count):
        assert client.get(f"/o/{signer.open_token(message_id, i)}").status_code == 200


@contextlib.contextmanager
def _served(settings: Settings, engine: Engine) -> Iterator[tuple[httpx.Client, Any]]:
    """The receiver under uvicorn, a client of it, and its event writer."""
    app = create_app(settings, engine)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        yield client, app.state.event_writer


def test_a_killed_writer_process_is_replaced_and_loses_nothing(
    make_settings: Callable[..., Settings], engine: Engine, database_url: str
) -> None:
    settings = make_settings(database_url=database_url, event_flush_interval=0.02)
    signer = Signer(settings.signing_keys())
    with _served(settings, engine) as (client, writer):
        _hits(client, signer, 11, 100)
        first = writer.writer_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # batches on their way to it are sent again
        _hits(client, signer, 12, 300)
        wait_for(lambda: writer.writer_pid != first and _health(client)["event_writer"] == "ok")
        _hits(client, signer, 13, 100)
        wait_for(lambda: count_events(engine) == 500, timeout=30)
        wait_for(lambda: _health(client)["queue_depth"] == 0)
    assert _distinct_keys(engine) == 500


def test_what_the_writer_never_took_is_journaled_at_stop(
    make_settings: Callable[..., Settings], engine: Engine, database_url: str
) -> None:
    settings = make_settings(database_url=database_url, event_flush_interval=0.02)
    signer = Signer(settings.signing_keys())
    with _served(settings, engine) as (client, writer):
        pid = writer.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _hits(client, signer, 14, 50)  # the server stops before a new writer starts
    assert count_events(engine) == 0
    assert sorted((settings.var_dir / "journal").glob("events-*.jsonl"))
    with ServerThread(create_app(settings, engine)):
        wait_for(lambda: count_events(engine) == 50, timeout=30)
    assert _distinct_keys(engine) == 50


def test_batches_that_queue_up_are_written_together_and_all_acknowledged(
    engine: Engine, tmp_path: Path
) -> None:
    loop = WriterLoop(
        BatchStore(engine, store_full_ip=False),
        Journal(tmp_path / "journal", prefix=JOURNAL_PREFIX),
    )
    batches = []
    for batch_id in range(1, 7):
        raw = [new_event("open", 15, i, 0, "192.0.2.1", "curl/8", "GET") for i in range(10)]
        prefix, first = event_keys.reserve(len(raw))
        batches.append((batch_id, prefix, first, raw))
    loop.batches(batches)
    report = loop.take_report()
    assert report["acked"] == [1, 2, 3, 4, 5, 6]
    assert len(report["writes"]) == 2  # four batches, then two
    assert report["recorded"] == [["open", "scanner", 60]]
    assert count_events(engine) == 60
    assert _distinct_keys(engine) == 60
    loop.journal.close()

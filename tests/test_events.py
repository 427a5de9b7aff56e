"""The event pipeline: journaling while the database is down, replay, restarts, no duplicates.

"Down" is real: for PostgreSQL the receiver reaches the database through a TCP
proxy that the test stops (connections refused, open ones reset); for SQLite
another connection holds the write lock (``BEGIN EXCLUSIVE``), as a long
migration or a backup would.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from receiver_support import (
    Outage,
    ServerThread,
    count_events,
    event_rows,
    start_receiver,
    wait_for,
)
from sqlalchemy import Engine

from receiver.app import create_app
from receiver.events import Journal, truncate_ip
from shared.config import Settings
from shared.tokens import Signer


@pytest.fixture
def outage(database_url: str) -> Iterator[Outage]:
    o = Outage(database_url)
    yield o
    o.close()


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
    assert journaled is not None and int(journaled[1]) > 0


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
    journal = Journal(tmp_path)
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
    live = Journal(tmp_path)
    live.append([{"event_key": "x"}])  # open and locked, as in a running worker
    other = Journal(tmp_path)
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

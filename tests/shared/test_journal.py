"""The journal on a full disk: nothing half-written, the receiver keeps serving,
the relay counts what it loses.

The disk is really full: the journal directory is a 64 KiB tmpfs mounted for
the test (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from receiver.app import create_app
from relay.prepared import Copy, MessageRecord, Prepared
from relay.record import Delivery, Recorder
from relay.upstream import Reply
from shared import db
from shared.config import Settings
from shared.journal import Journal
from shared.tokens import Signer
from tests.support.receiverkit import Outage, ServerThread, count_events, wait_for
from tests.support.relaykit import running_recorder


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "var" / "journal"
    mountpoint.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_a_failed_append_leaves_no_partial_line(tiny_disk: Path) -> None:
    journal = Journal(tiny_disk, prefix="t")
    journal.append([{"n": 0}])
    big = [{"n": i, "pad": "x" * 1000} for i in range(1, 200)]  # ~200 KB: cannot fit
    with pytest.raises(OSError) as caught:
        journal.append(big)
    assert caught.value.errno == errno.ENOSPC
    journal.append([{"n": "after"}])  # the disk still has room for small records
    journal.seal()
    assert [r["n"] for r in journal.read_slice(1000)] == [0, "after"]
    assert journal.skipped == 0
    journal.close()


def _fill(disk: Path) -> None:
    def forever(write: Callable[[bytes], object]) -> None:
        while True:
            write(b"x" * 4096)

    with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as caught:
        forever(f.write)
    assert caught.value.errno == errno.ENOSPC


def test_a_new_file_the_full_disk_refuses_is_removed(tiny_disk: Path) -> None:
    """The first append to a new file fails: OSError, and no empty file is left."""
    _fill(tiny_disk)
    journal = Journal(tiny_disk, prefix="t")
    with pytest.raises(OSError) as caught:
        journal.append([{"n": 1, "pad": "x" * 8192}])
    assert caught.value.errno == errno.ENOSPC
    assert list(tiny_disk.glob("t-*.jsonl")) == []
    journal.close()


def test_relay_counts_the_records_it_loses_when_database_and_journal_disk_fail(
    make_settings: Callable[..., Settings],
    tiny_disk: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Never the mail and never silently: each lost record is counted and logged."""
    settings = make_settings()
    broken = db.make_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # never migrated
    recorder = Recorder(settings, broken)
    _fill(tiny_disk)
    ok = Reply(250, "2.0.0 Ok")
    items = [
        (
            Prepared(
                [Copy(["a@example.net"], b"x")],
                MessageRecord(id=i, subject="x" * 8192),
                [],
                set(),
            ),
            Delivery({"a@example.net": ok}, [], ok),
        )
        for i in (1, 2, 3)
    ]

    async def scenario() -> None:
        async with running_recorder(recorder):
            await asyncio.gather(*(recorder.record(*item) for item in items))

    with caplog.at_level(logging.ERROR, logger="relay.record"):
        asyncio.run(scenario())
    broken.dispose()
    assert (recorder.counts.lost, recorder.counts.journaled) == (3, 0)
    assert caplog.text.count("RELAY JOURNAL WRITE FAILED") == 3


def test_receiver_keeps_serving_when_the_journal_disk_is_full(
    make_settings: Callable[..., Settings],
    tiny_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(event_flush_interval=0.05)
    db.upgrade(settings.db_url)
    engine = db.make_engine(settings.db_url)
    outage = Outage(settings.db_url)
    signer = Signer(settings.signing_keys())
    agent = "Mozilla/5.0 " + "x" * 1000  # ~1.3 KB per journaled hit: 64 KiB fills quickly
    hits = 400
    try:
        with (
            caplog.at_level(logging.ERROR, logger="receiver.events"),
            ServerThread(create_app(settings, engine)) as server,
            httpx.Client(base_url=server.url, headers={"user-agent": agent}) as client,
        ):
            outage.down()
            for i in range(hits // 2):
                pixel = client.get(f"/o/{signer.open_token(9, i)}")
                assert pixel.status_code == 200
                assert len(pixel.content) == 43
                url = f"https://example.com/{i}"
                click = client.get(f"/c/{signer.click_token(9, i, 1, url)}")
                assert (click.status_code, click.headers["location"]) == (302, url)
            # Every hit ends journaled or dropped (the writer first waits out the lock).
            metrics = wait_for(lambda: _accounted(_numbers(client.get("/metrics").text), hits))
            assert metrics["dropped"] > 0, "the disk never filled"
            assert metrics["journaled"] > 0
            health = client.get("/healthz")
            assert health.status_code == 503
            assert health.json()["event_writer"] == "dropping"  # not "ok" while hits are lost
            outage.up()
            wait_for(lambda: count_events(engine) == metrics["journaled"], timeout=30)
            wait_for(lambda: client.get("/healthz").json()["journal_files"] == 0)
            after = _numbers(client.get("/metrics").text)
    finally:
        outage.close()
        engine.dispose()
    # Every hit is either in the database or counted as dropped: none vanished silently.
    assert count_events(db.make_engine(settings.db_url)) + after["dropped"] == hits
    assert "cannot write the event journal" in caplog.text
    print(f"disk full: {hits} hits, {metrics['journaled']} journaled, {after['dropped']} dropped")


def _accounted(metrics: dict[str, int], hits: int) -> dict[str, int] | None:
    return metrics if metrics["journaled"] + metrics["dropped"] == hits else None


def _numbers(text: str) -> dict[str, int]:
    found = re.findall(r"^trackrelay_events_(\w+)_total (\d+)$", text, re.M)
    return {name: int(value) for name, value in found}
